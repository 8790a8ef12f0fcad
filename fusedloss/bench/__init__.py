"""fusedloss-bench: times and peak memory of every fusedloss op against its
plain-PyTorch reference, ``torch.compile`` of it and public peers, with a
max-abs-difference check of loss and gradients so a fast-but-wrong result is
flagged.  Run ``python -m fusedloss.bench --help``.

Layout: ``cases`` (one adapter per op), ``variants`` (fused / reference /
compile / peers / bare GEMMs), ``measure`` (timing, peak memory, the CPU
subprocess worker), ``runner`` (rows, OOM handling, diffs), ``report`` (tables,
JSON), ``plot`` (PNG), ``presets`` (shape sets).
"""
