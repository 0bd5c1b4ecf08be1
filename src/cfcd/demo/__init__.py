"""The offline demo (``cfcd demo``) and the own-photos search (``cfcd demo --images DIR --query PHOTO``).

* :mod:`cfcd.demo.data`: a revisitop benchmark and a disjoint GLDv2 training list from real photos;
* :mod:`cfcd.demo.pipeline`: baseline, CFCD fine-tuning (stage 1, confusions, stage 2), evaluation,
  index, search, resumable step by step;
* :mod:`cfcd.demo.report`: the self-contained ``report.html``;
* :mod:`cfcd.demo.photos`: search your own photos with a persistent, incremental index.
"""

from cfcd.demo.data import build_demo_data, check_disjoint, load_demo_data, synthetic_view
from cfcd.demo.pipeline import MODES, run_demo

__all__ = ["MODES", "build_demo_data", "check_disjoint", "load_demo_data", "run_demo", "synthetic_view"]
