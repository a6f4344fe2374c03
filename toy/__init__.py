"""The embedded teacher: a tiny class-conditional diffusion model of scikit-learn's digits, its data (digits.py), its
training (train_teacher.py), the 2AFC data of its L-LPIPS (make_2afc.py), and its judge with the paper's tables at
toy scale (tables.py, run by eval.py --table)."""
