"""Privacy, measured: what an honest-but-curious backbone can recover of a client's data.

* :mod:`.records`: synthetic private records (patient notes) with marked sensitive fields;
* :mod:`.observe`: a client's split in one process, releasing exactly what a backbone
  receives (h1, the mask, h2, grad_h2), with the client's perturbation;
* :mod:`.attacks`: learned inversion, nearest-embedding inversion, label leakage;
* :mod:`.scoring`: token recovery, sensitive-field exact match, ROUGE-L;
* :mod:`.harness`: fine-tune and keep what the backbone saw, fit and score the attacks.

``splitfed privacy attack`` and ``bench/privacy.py`` use them; docs/privacy.md has the
method and the measured privacy-utility curve.
"""
