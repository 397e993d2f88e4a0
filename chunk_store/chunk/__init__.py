"""The chunk stage: input folders and files (text, JSONL, Parquet, compressed) -> tokenised,
packed chunk / doc-id / sequence arrays in one new shard. ``stage.py`` holds the stage;
``text_files.py`` walks and decodes inputs, ``input_formats.py`` reads records, ``packing.py``
tokenises and packs a unit of work into part files (``part_files.py``), merged into a shard by
``chunk_store.shards``."""
