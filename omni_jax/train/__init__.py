"""Training: train step (step.py), Grain data pipeline (data.py), trainer loop (loop.py), toy task (toy.py)."""
