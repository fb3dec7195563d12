"""Evaluate a pretrained run: python eval.py --workdir=runs/demo [--split=held_out]"""

from cvmae_jax.cli import eval_main

if __name__ == "__main__":
    eval_main()
