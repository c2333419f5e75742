"""The GUI's services over one workspace, built once and handed to the tabs.

    ctrl = Controller(Workspace("workspace"))
    ctrl.configs.build("sd-train", base, values); ctrl.runs.start(...); ctrl.adapters.rows(); ...
"""
from __future__ import annotations

from typing import Optional

from .demo import ensure_demo_dataset
from .errors import UserError  # noqa: F401 (the services' error, re-exported)
from .queue import JobQueue
from .services.adapters import AdapterService
from .services.compare import CompareService
from .services.configs import ConfigService
from .services.evals import EvalService
from .services.generation import GenerationService
from .services.runs import RunService
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
        self.generation = GenerationService(self.ws)
        self.adapters = AdapterService(self.ws)
        self.compare = CompareService(self.ws, self.queue, self.configs)
