"""Coverage-guided fuzz of the network reader (atheris), for runs longer than CI's.

    pip install atheris
    python fuzz/reader.py -max_total_time=3600 -rss_limit_mb=4096 fuzz/corpus

Any exception other than a loha error is a finding. Seed the corpus folder with a few
real .safetensors LoHa files for better coverage.
"""

import os
import sys
import tempfile

import atheris
import safetensors  # noqa: F401  (imported first so only loha's own code is instrumented)
import torch  # noqa: F401

with atheris.instrument_imports(include=["loha"]):
    import loha

_PATH = os.path.join(tempfile.mkdtemp(prefix="loha-fuzz-"), "input.safetensors")


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        net = loha.load(_PATH)
    except loha.LohaError:
        return
    for module in net.modules.values():  # touch what a patch would read
        net.tensors(module)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
