"""What the buttons do, without Gradio: small services over the workspace, each in its own module.

job_configs   form values <-> validated configs, saved configs             (ConfigService)
runs          start / preview / stop / resume runs, queue rows             (RunService)
evals         the evaluation suite and its table                           (EvalService)
uploads       dataset check and upload                                     (UploadService)
datasets      the Dataset tab: images, buckets, caption edits              (DatasetService)
browse        what a path chosen in a workspace file browser stands for       (BrowseService)
captions      captioning with a local model through `lora-sd caption`      (CaptionService)
generation    images and text through the CLIs                             (GenerationService)
adapter_files list / inspect / convert / merge / delete adapter files      (AdapterService)
fit           an adapter's fit from headers alone, and the fit badge       (functions)
grids         comparison grids: sources, start, progress                   (GridService)
grid_request  a grid's request -> `lora-sd grid` arguments and labels      (GridRequest)
grid_folder   a grid's folder read as it fills in: cells, their parameters (GridFolder)
grid_scores   the concept score under a grid                               (functions)
text_compare  text runs' metrics and generations side by side              (TextCompareService)
sweeps        queue a sweep, list sweeps, a sweep's table and curves       (SweepService)
preflight     `check` on a config and `inspect --base` on an adapter       (PreflightService)
plots         the loss curve and the evaluation chart                      (functions)

Every method takes plain values and returns plain values; a bad value raises a ValueError
(ConfigError, PathError, QueueError, UserError) whose one-line message the page shows as it is.
"""
