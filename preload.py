"""WebUI command-line options of the LoHa extension (read by the WebUI before it parses them)."""

import os

from modules import paths


def preload(parser):
    parser.add_argument("--loha-dir", type=str, default=os.path.join(paths.models_path, "LoHa"),
                        help="folder of LoHa networks for <loha:…> (the Lora folder is listed too)")
