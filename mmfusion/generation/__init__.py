"""Generation: the three samplers (CausalFusion's next-token(s) diffusion, Token-Shuffle's autoregressive
codes, caption decoding), their settings types and the helpers they share."""
