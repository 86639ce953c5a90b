"""`python -m lora_kernels params`: the 2·r/√P rule of thumb and the exact
count after inject_lora on a model built from a config."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lora_kernels.__main__ import main
from lora_kernels.interop import params as params_table


@pytest.mark.parametrize(
    ("r", "size", "expected"),
    [(8, "7B", "0.019%"), (1024, "180B", "0.483%"), (16, "13B", "0.028%"), (1, "180B", "<0.001%")],
)
def test_rule_of_thumb_examples(r, size, expected):
    share = params_table.estimated_share(r, params_table.MODEL_SIZES[size])
    assert share == pytest.approx(100 * 2 * r / math.sqrt(params_table.MODEL_SIZES[size]))
    assert params_table.format_percent(share) == expected


def test_estimate_table_covers_every_rank_and_size(capsys):
    assert main(["params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header == ["r", "7B", "13B", "70B", "180B"]
    rows = {int(line.split()[0]): line.split()[1:] for line in lines[3:]}
    assert sorted(rows) == sorted(params_table.RANKS)
    assert rows[8][0] == "0.019%" and rows[1024][3] == "0.483%"


def write_tiny_llama_config(directory) -> str:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_exact_count_matches_the_layer_shapes(tmp_path):
    pytest.importorskip("transformers")
    path = write_tiny_llama_config(tmp_path)
    base, rows = params_table.exact_shares(path, ["q_proj", "v_proj"], ranks=(1, 8))
    # per layer: q_proj 64→64, v_proj 64→32 (2 KV heads of 16); 2 layers
    per_rank = 2 * ((64 + 64) + (64 + 32))
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64  # q,o; k,v; MLP; two norms
    assert base == 2 * 100 * 64 + 2 * layer + 64  # embeddings, lm_head, layers, final norm
    for r, trainable, total, percent in rows:
        assert trainable == r * per_rank
        assert total == base + trainable
        assert percent == pytest.approx(100 * trainable / total)


def test_cli_with_a_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = write_tiny_llama_config(tmp_path)
    assert main(["params", "--model", path, "--target-modules", "all-linear", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    trainable = 2 * 2 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 96) + (96 + 64))
    assert f"{trainable:,}" in out and "estimate 2r/sqrt(P)" in out

    assert (
        main(
            [
                "params",
                "--model",
                path,
                "--target-regex",
                r".*\.0\.self_attn\.q_proj",
                "--ranks",
                "1",
            ]
        )
        == 0
    )
    assert f"{64 + 64:,}" in capsys.readouterr().out


def test_cli_errors():
    with pytest.raises(SystemExit):
        main(["params", "--target-modules", "q_proj"])
    with pytest.raises(SystemExit):
        main(["params", "--ranks", "0"])
    with pytest.raises(SystemExit):
        main(["params", "--ranks", "a,b"])


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "lora_kernels", "params", "--ranks", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "0.019%" in result.stdout
