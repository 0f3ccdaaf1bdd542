"""``python -m timm_kd`` (and ``accelerate launch -m timm_kd train ...``): the ``timm-kd`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
