from herd.data.packing import PackedDataset, pack_documents
from herd.data.text import TextDataModule
from herd.data.tokenizer import load_tokenizer

__all__ = ["PackedDataset", "TextDataModule", "load_tokenizer", "pack_documents"]
