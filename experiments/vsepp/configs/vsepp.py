r"""VSE++: max of hinges (hardest negative), the paper's main model; same as default.

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/vsepp.py \
        --config.data.manual_dir=/path/to/f30k_precomp --config.data.name=f30k \
        --workdir=/tmp/vsepp_f30k
"""

from experiments.vsepp.configs import default


def get_config():
    return default.get_config()
