"""Diffusion: noise schedules, the CausalFusion training objective and the next-token(s) sampler."""
