"""The backends: one package each, each defining ``BACKEND`` (see ``ops/registry.py``).

``torch`` is the pure-PyTorch reference (the test oracle and the fallback);
``cpu`` and ``cuda`` run the compiled extension's kernels (``csrc/``);
``triton`` runs fused Triton kernels.
"""
