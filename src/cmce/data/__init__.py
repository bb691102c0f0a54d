"""Data: sources → one dataset Parquet file, and the readers that decode it for training and embedding.

    schema      the dataset file's columns; DataError; RawImages (what an importer returns)
    sources     the data.source registry over cmce.importers (Fashion-MNIST, digits, ImageFolder, emoji,
                CUB-200-2011, Cars196, Stanford Online Products)
    protocols   which images are train and which test: heldout, disjoint, cross_vendor
    prepare     a source under its protocol → the dataset file; validation datasets carved from train
    codec       image bytes → uint8 arrays (and imported images → PNG)
    readers     a dataset file's metadata, a split decoded whole or in row batches
    loader      a split streamed by row-group chunks, sharded, with decoding workers (embedding)
    augment     training augmentation, batched on the device

Dataset Parquet columns: id (string), label (int32), class_name (string), split ("train"/"test"),
image (PNG bytes, or a source's RGB/grey JPEG bytes unchanged), and optionally domain (string: the
rendering domain of the image, e.g. the emoji vendor; written only by sources that have one, so files
without it stay valid). Schema metadata key ``cmce`` holds JSON: source, protocol, classes, seed, and
disjoint_by (the class split used) / domains where they apply.
"""

