"""Coverage-guided fuzzing (atheris / libFuzzer) of the ``.bna`` reader and the data loaders.

Run: ``python fuzz/fuzz_inputs.py [CORPUS_DIR] -max_total_time=600`` (by hand), or as CI does:
``python fuzz/fuzz_inputs.py -max_total_time=20``. Without a corpus folder it starts from the
seeds of ``fuzz/targets.py`` in a temporary folder. Any exception other than the tool's own
input errors stops it with the crashing input written to ``crash-*``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["bna_export", "numpy.lib", "zipfile", "json"]):
    import targets


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = tempfile.mkdtemp(prefix="bna-corpus-")
        for name, data in targets.seeds().items():
            with open(os.path.join(corpus, f"seed-{name}"), "wb") as f:
                f.write(data)
        args.append(corpus)
    atheris.Setup(args, targets.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
