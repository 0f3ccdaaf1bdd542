"""Model card templates and citations, installed as ``timm_kd.model_cards``.

``student_card.md`` is the Jinja2 template ``timm_kd.hub.card`` renders with
``huggingface_hub.ModelCard.from_template``; ``citations.bib`` holds the BibTeX entries the
built-in losses' cards cite (a plug-in loss brings its own in its ``LossCard.bibtex``).
Edit them here: ``pyproject.toml`` maps this folder to the ``timm_kd.model_cards`` package.
"""
