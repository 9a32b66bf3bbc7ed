"""Data: the built-in shapes set, loaders for captioned image folders and COCO, the DataModule."""
