from herd.systems.language import LanguageSystem

__all__ = ["LanguageSystem"]
