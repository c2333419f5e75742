"""What the buttons do, without Gradio: small services over the workspace, each in its own module.

configs     form values <-> validated configs, saved configs         (ConfigService)
runs        start / preview / stop / resume runs, queue rows         (RunService)
evals       the evaluation suite and its table                       (EvalService)
uploads     dataset check and upload                                 (UploadService)
generation  images and text through the CLIs                         (GenerationService)
adapters    list / inspect / convert / merge / delete adapter files  (AdapterService)
compare     grids, LLM metrics, sweeps, preflight check, fit badge  (CompareService)
plots       the loss curve and the evaluation chart                  (functions)

Every method takes plain values and returns plain values; a bad value raises a ValueError
(ConfigError, PathError, QueueError, UserError) whose one-line message the page shows as it is.
"""
