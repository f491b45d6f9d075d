"""Model card templates of moco-hf (rendered by `moco_hf.hub.render_model_card`)."""
