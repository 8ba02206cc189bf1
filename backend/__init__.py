"""tag2mask's Label Studio ML backend service: config parsing, result items, image fetching, HTTP API.

Modules: label_config (labeling config -> controls), ls_results (PhotoResult -> result items),
image_fetch (task image URL -> photo, guarded), model (Tag2MaskModel: setup/predict/fit),
server (create_app), serve (gunicorn runner), settings (environment).
"""
