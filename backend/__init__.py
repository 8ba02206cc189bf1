"""tag2mask's Label Studio ML backend service, by concern (each package's docstring says more):

``settings`` (the environment, read once), ``untrusted`` (request values), ``labelstudio`` (Label
Studio's config, tasks, annotations, results, photos, client), ``serving`` (engine, heads, versions,
the predict function), ``storage`` (Redis keys and connection, caches, example store, registry),
``queue`` (queues, retries, workers), ``training`` (webhook, schedule, trainer), ``web`` (the Flask
app and gunicorn), ``cli`` (the ``tag2mask`` command line), ``jobs`` (RQ job functions).
Dependencies point one way: backend uses explainers, never the reverse.
"""
