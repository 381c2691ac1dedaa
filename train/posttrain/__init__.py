"""Post-training: SFT (the normal train loop), reward model, RLHF with PPO, DPO."""
