"""The embedded teacher: a tiny class-conditional diffusion model of scikit-learn's digits."""
