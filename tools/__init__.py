"""Diagnostics and tooling beside the paper's files: the step timing (ours and TRL's), the 7B preset's GPU
memory, the head-only probe of what RFT's image reward asks for, and the reliability tries. Each runs as
`python tools/<name>.py` from the repository root or anywhere else."""
