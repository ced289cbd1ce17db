"""The pipeline's plumbing around the model library: params.yaml and sources.yaml, downloads,
the report page and metric comparison. The DVC stages in `stages/` call these; nothing in the
model library (`llm.*` outside this package) imports them.
"""
