"""Training datasets from masks: COCO instances, YOLO segmentation and class-id PNGs, written from
``tag2mask label``'s results or from a Label Studio JSON export (``tag2mask export``).

Modules: ``instances`` (masks -> connected-component instances, shared by every format), ``coco``,
``yolo_seg``, ``class_png`` (one writer per format), ``formats`` (the formats by name and
:class:`~backend.datasets.formats.DatasetExport`, which feeds every chosen format), ``files``
(atomic writes, placing photos), ``from_labelstudio`` (a Label Studio export's tasks -> photos and
masks). Knows nothing of Redis, RQ or torch.
"""

# components of fewer pixels are specks (CRF / upsampling noise), not objects: left out of every format.
# Here, not in backend.datasets.instances, so that the command line's --help reads it without numpy.
MIN_INSTANCE_PIXELS = 8
