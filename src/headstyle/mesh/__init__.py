"""Coloured meshes of a generator's heads (PLY, OBJ, GLB) and PanoHead's .mrc density volume.

    field_sampler(ws) --volume (PanoHead's cube, bounded batches)--> sigma[x, y, z]
      --marching cubes (level 10)--> largest component --Taubin (optional)--> decimation (optional)
      --> vertex colours (--> xatlas UV atlas --> texture baked from the field, optional) --> files
"""

from headstyle.mesh.decimate import MIN_FACES, decimate
from headstyle.mesh.files import FORMATS, MESH_FORMATS, parse_formats, side_by_side, write_mesh, write_mrc
from headstyle.mesh.heads import HeadMesh, MeshSettings, Track, export_meshes, head_mesh
from headstyle.mesh.surface import PANOHEAD_LEVEL, EmptySurfaceError, isosurface, largest_component, smooth
from headstyle.mesh.texture import TEXTURE_SIZES, Atlas, bake_texture, texel_coverage, textured_mesh, unwrap
from headstyle.mesh.volume import PANOHEAD_TRIM, Cube, Volume, extraction_cube, sample_volume

__all__ = [
    "FORMATS",
    "MESH_FORMATS",
    "MIN_FACES",
    "PANOHEAD_LEVEL",
    "PANOHEAD_TRIM",
    "TEXTURE_SIZES",
    "Atlas",
    "Cube",
    "EmptySurfaceError",
    "HeadMesh",
    "MeshSettings",
    "Track",
    "Volume",
    "bake_texture",
    "decimate",
    "export_meshes",
    "extraction_cube",
    "head_mesh",
    "isosurface",
    "largest_component",
    "parse_formats",
    "sample_volume",
    "side_by_side",
    "smooth",
    "texel_coverage",
    "textured_mesh",
    "unwrap",
    "write_mesh",
    "write_mrc",
]
