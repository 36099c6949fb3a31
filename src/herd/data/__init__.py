from herd.data.images import ImageDataModule
from herd.data.packing import PackedDataset, pack_documents
from herd.data.speech import SpeechDataModule
from herd.data.text import TextDataModule
from herd.data.tokenizer import load_tokenizer

__all__ = [
    "ImageDataModule",
    "PackedDataset",
    "SpeechDataModule",
    "TextDataModule",
    "load_tokenizer",
    "pack_documents",
]
