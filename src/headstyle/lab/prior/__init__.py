"""The lab's priors: the learned SD-shaped prior (recipe, data, models, train, card, learned) and the exemplar prior."""
