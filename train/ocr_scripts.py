"""Text sources of the multilingual synthetic OCR set (train/ocr_data.py, charset=multilingual): common words per
script, limited to the scripts a font available without downloads can draw.

Fonts: matplotlib ships the DejaVu faces (DejaVuSans, -Serif, -SansMono and their bold / oblique variants), the
STIX and Computer Modern faces (Latin, Greek, some Cyrillic, maths) and LastResort (boxes); Debian-based systems
often add the same DejaVu faces under /usr/share/fonts/truetype/dejavu. PIL's built-in default font is Latin only.
DejaVu Sans is the widest (checked against its cmap): Latin with diacritics, Greek, Cyrillic, Armenian,
Georgian, Hebrew and Arabic are covered and listed in SCRIPT_WORDS (Arabic letters are joined and Arabic /
Hebrew laid out right to left by PIL's libraqm layout, when PIL has it; without it they would be drawn unjoined in
logical order, so the generator refuses them: `rtl_layout_available`).

Not covered, no face without a download: Han (Chinese, Japanese kanji), Hiragana / Katakana, Hangul, Devanagari
and the other Indic scripts, Thai, Lao (DejaVu has part of it), Khmer, Myanmar, Ethiopic, Sinhala, Tibetan.
Add a font folder (OCRGenConfig.font_dir) holding e.g. Noto faces to extend SCRIPT_WORDS to them.

The reference text is stored in logical order (as typed), whatever the drawing direction.
"""
from __future__ import annotations

WORDS_LATIN = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother"
).split()
WORDS_GREEK = "και του της το να είναι για με από στο την που ένα θα δεν λόγος νερό ήλιος άνθρωπος".split()
WORDS_CYRILLIC = "и в не на я быть он с что а по это она этот к но они мы как из у который то за свой".split()

# Latin with diacritics (French, German, Spanish, Polish, Czech, Vietnamese): precomposed (NFC) letters
WORDS_LATIN_DIACRITICS = (
    "été déjà très où garçon français über größe schön mädchen straße año niño señor mañana łódź gęś żółw "
    "jaźń řeka čas přítel tiếng việt người nước không"
).split()
WORDS_ARMENIAN = "բարև հայերեն տուն ջուր մայր գիրք".split()
WORDS_GEORGIAN = "გამარჯობა სახლი წყალი დედა წიგნი ქართული".split()
WORDS_HEBREW = "שלום בית מים ספר אמא עברית".split()
WORDS_ARABIC = "مرحبا بيت ماء كتاب أم العربية شمس".split()

# script name (as eval/ocr_metrics.text_script labels references) -> word list
SCRIPT_WORDS: dict[str, list[str]] = {
    "Latin": WORDS_LATIN + WORDS_LATIN_DIACRITICS,
    "Greek": WORDS_GREEK,
    "Cyrillic": WORDS_CYRILLIC,
    "Armenian": WORDS_ARMENIAN,
    "Georgian": WORDS_GEORGIAN,
    "Hebrew": WORDS_HEBREW,
    "Arabic": WORDS_ARABIC,
}
RTL_SCRIPTS = ("Hebrew", "Arabic")
NOT_COVERED = ("Han", "Hiragana", "Katakana", "Hangul", "Devanagari", "Bengali", "Tamil", "Telugu", "Thai", "Lao",
               "Khmer", "Myanmar", "Ethiopic", "Sinhala", "Tibetan")


def rtl_layout_available() -> bool:
    """Whether PIL can shape and lay out right-to-left text (libraqm with FriBiDi)."""
    from PIL import features

    return bool(features.check("raqm"))
