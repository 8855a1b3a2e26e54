"""Reference Flower app for fedgate: brain-MRI (Br35H) tumour classification."""
