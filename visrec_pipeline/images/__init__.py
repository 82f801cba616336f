"""Item images: validation and thumbnails (``validate``), the content-addressed store (``store``),
the Wikimedia Commons client (``commons``) and the resumable catalogue sync (``sync``)."""
