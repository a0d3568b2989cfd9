"""`python -m models.examples` writes the examples; `python -m models.examples --spec` prints their --models."""

import sys

from models.examples import spec, write_examples

if sys.argv[1:] == ["--spec"]:
    print(spec())
else:
    write_examples()
