"""Model card templates and citations, installed as ``timm_kd.model_cards``.

``student_card.md`` is the Jinja2 template ``timm_kd.hub`` renders with
``huggingface_hub.ModelCard.from_template``; ``citations.bib`` holds the BibTeX of each method.
Edit them here: ``pyproject.toml`` maps this folder to the ``timm_kd.model_cards`` package.
"""
