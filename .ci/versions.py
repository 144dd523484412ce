"""Prints the installed JAX stack and fails when it is not the end of the supported range CI meant to test."""
import argparse
import sys
from importlib.metadata import version

STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def _tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-oldest", metavar="CONSTRAINTS", help="every pin in this file is what is installed")
    ap.add_argument("--expect-jax-at-least", metavar="VERSION")
    args = ap.parse_args()
    installed = {name: version(name) for name in STACK}
    print(f"Python {sys.version.split()[0]}: " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    wrong = []
    if args.expect_oldest:
        for line in open(args.expect_oldest):
            line = line.split("#")[0].strip()
            if line:
                name, want = line.split("==")
                have = installed.get(name) or version(name)
                if have != want:
                    wrong.append(f"{name} {have} installed, the oldest stack pins {want}")
    if args.expect_jax_at_least and _tuple(installed["jax"]) < _tuple(args.expect_jax_at_least):
        wrong.append(f"jax {installed['jax']} installed: the newest stack should have jax >= "
                     f"{args.expect_jax_at_least}")
    for w in wrong:
        print(f"CI: {w}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
