"""``python -m elra_fused``: the main job (see :mod:`elra_fused.train`);
``python -m elra_fused lm ...``: the language-model job (see :mod:`elra_fused.lm`)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["lm"]:
        from .lm import main as lm_main

        lm_main(sys.argv[2:])
    else:
        from .train import main

        main()
