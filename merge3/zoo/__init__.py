"""Demo zoos built locally from real data that ships inside registry packages."""

from merge3.zoo._digits import (DigitsRecipe, FolderZoo, Zoo, build_digits_zoo, domain_transform, print_zoo_table,
                                write_domain_bank)
from merge3.zoo._federated import ClientData, digits_clients, write_federated_bank
from merge3.zoo._minilm import MiniLMRecipe, MiniLMZoo, build_minilm_zoo, load_bbc_articles, tiny_recipe
from merge3.zoo._smollm import SmolLMRecipe, SmolLMZoo, build_smollm_zoo, reduced_recipe

__all__ = [
    "ClientData",
    "DigitsRecipe",
    "FolderZoo",
    "MiniLMRecipe",
    "MiniLMZoo",
    "SmolLMRecipe",
    "SmolLMZoo",
    "Zoo",
    "build_digits_zoo",
    "build_minilm_zoo",
    "build_smollm_zoo",
    "digits_clients",
    "domain_transform",
    "load_bbc_articles",
    "print_zoo_table",
    "reduced_recipe",
    "tiny_recipe",
    "write_domain_bank",
    "write_federated_bank",
]
