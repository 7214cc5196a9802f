"""Model card template and the cards of the converted paper checkpoints (shipped as bd3lm_hf.model_cards)."""
