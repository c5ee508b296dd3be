"""Min-max entropy weakly supervised localisation: model, losses and training loops."""
