"""``python -m elra_fused``: the main job (see :mod:`elra_fused.train`)."""

from .train import main

if __name__ == "__main__":
    main()
