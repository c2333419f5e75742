"""The GUI's services over one workspace, built once and handed to the tabs.

    ctrl = Controller(Workspace("workspace"))
    ctrl.configs.build("sd-train", base, {"lora.r": 8, ...}); ctrl.runs.start(...); ctrl.adapters.rows(); ...
"""
from __future__ import annotations

from typing import Optional

from .demo import ensure_demo_dataset
from .queue import JobQueue
from .services.adapter_files import AdapterService
from .services.browse import BrowseService
from .services.captions import CaptionService
from .services.datasets import DatasetService
from .services.evals import EvalService
from .services.generation import GenerationService
from .services.grids import GridService
from .services.job_configs import ConfigService
from .services.preflight import PreflightService
from .services.runs import RunService
from .services.sweeps import SweepService
from .services.text_compare import TextCompareService
from .services.uploads import MAX_UPLOAD_BYTES, UploadService
from .workspace import Workspace


class Controller:
    def __init__(self, ws: Workspace, queue: Optional[JobQueue] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.ws = ws.create()
        self.queue = queue or JobQueue(ws.queue_file, ws.root)
        self.configs = ConfigService(self.ws, ensure_demo_dataset(self.ws))
        self.runs = RunService(self.ws, self.queue, self.configs)
        self.evals = EvalService(self.ws, self.queue, self.configs)
        self.uploads = UploadService(self.ws, max_upload_bytes)
        self.browse = BrowseService(self.ws)
        self.datasets = DatasetService(self.ws)
        self.captions = CaptionService(self.ws)
        self.generation = GenerationService(self.ws)
        self.adapters = AdapterService(self.ws)
        self.grids = GridService(self.ws)
        self.text_compare = TextCompareService(self.ws)
        self.sweeps = SweepService(self.ws, self.queue, self.configs)
        self.preflight = PreflightService(self.ws, self.configs)
