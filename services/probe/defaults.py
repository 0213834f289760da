"""Limits of model identification: what a file may cost before it is refused.

They bound the work an archive can make the pickle scanner do. A Stable Diffusion XL checkpoint's
``data.pkl`` is about 0.3 MB and 80,000 opcodes (2,500 tensors); the limits are two hundred times its
size and twenty-five times its opcodes (60,000 tensors), far beyond any real checkpoint. A 1 MB zip
that inflates to a 1 GiB pickle is refused before a byte of it is inflated.
"""

PICKLE_MAX_BYTES = 64 << 20       # bytes of one pickle stream (inflated)
PICKLE_MAX_OPCODES = 2_000_000    # opcodes of one file's pickle streams together
PICKLE_CHECK_EVERY = 65_536       # opcodes between two stop checks (a cancelled job stops within that)
