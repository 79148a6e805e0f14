"""WGS84 to VN-2000 plane coordinates, computed here from first principles and published
parameters, independently of PROJ: the positions a DXF drawing in VN-2000 must come back to.

VN-2000 uses the WGS84 ellipsoid, shifted by the seven parameters of Decision 05/2007/QĐ-BTNMT
(VN-2000 -> WGS84, position-vector convention), and the transverse Mercator projection: UTM
(scale 0.9996) or the provinces' TM-3 zones (scale 0.9999), false easting 500 km.
"""

from __future__ import annotations

import math

A = 6_378_137.0
F = 1 / 298.257223563
E2 = F * (2 - F)
# VN-2000 -> WGS84: metres, arc-seconds, parts per million.
TX, TY, TZ = -191.90441429, -39.30318279, -111.45032835
RX, RY, RZ = -0.00928836, 0.01975479, -0.00427372
DS = 0.252906278
ARCSEC = math.pi / (180 * 3600)

# The same system for PROJ, as a ward's surveyor would give it: Đà Nẵng's TM-3 zone (107°45').
DA_NANG_TM3 = (
    "+proj=tmerc +lat_0=0 +lon_0=107.75 +k=0.9999 +x_0=500000 +y_0=0 +ellps=WGS84 "
    f"+towgs84={TX},{TY},{TZ},{RX},{RY},{RZ},{DS} +units=m +no_defs"
)


def _ecef(lon: float, lat: float) -> tuple[float, float, float]:
    phi, lam = math.radians(lat), math.radians(lon)
    n = A / math.sqrt(1 - E2 * math.sin(phi) ** 2)
    return (
        n * math.cos(phi) * math.cos(lam),
        n * math.cos(phi) * math.sin(lam),
        n * (1 - E2) * math.sin(phi),
    )


def _geodetic(x: float, y: float, z: float) -> tuple[float, float]:
    lam = math.atan2(y, x)
    p = math.hypot(x, y)
    phi = math.atan2(z, p * (1 - E2))
    for _ in range(10):
        n = A / math.sqrt(1 - E2 * math.sin(phi) ** 2)
        h = p / math.cos(phi) - n
        phi = math.atan2(z, p * (1 - E2 * n / (n + h)))
    return math.degrees(lam), math.degrees(phi)


def wgs84_to_vn2000_geodetic(lon: float, lat: float) -> tuple[float, float]:
    """Inverts X_wgs = T + (1 + s) R X_vn (small rotations: R^-1 = R^T)."""
    x, y, z = _ecef(lon, lat)
    x, y, z = x - TX, y - TY, z - TZ
    scale = 1 + DS * 1e-6
    rx, ry, rz = RX * ARCSEC, RY * ARCSEC, RZ * ARCSEC
    # R (position vector) = [[1, -rz, ry], [rz, 1, -rx], [-ry, rx, 1]]; apply R^T.
    xv = (x + rz * y - ry * z) / scale
    yv = (-rz * x + y + rx * z) / scale
    zv = (ry * x - rx * y + z) / scale
    return _geodetic(xv, yv, zv)


def transverse_mercator(
    lon: float, lat: float, lon0: float, k0: float, false_easting: float = 500_000.0
) -> tuple[float, float]:
    """Krüger's series to n^4 (millimetre accuracy within a zone): (easting, northing)."""
    n = F / (2 - F)
    big_a = A / (1 + n) * (1 + n**2 / 4 + n**4 / 64)
    alpha = (
        n / 2 - 2 * n**2 / 3 + 5 * n**3 / 16 + 41 * n**4 / 180,
        13 * n**2 / 48 - 3 * n**3 / 5 + 557 * n**4 / 1440,
        61 * n**3 / 240 - 103 * n**4 / 140,
        49561 * n**4 / 161280,
    )
    phi, lam = math.radians(lat), math.radians(lon - lon0)
    e = math.sqrt(E2)
    t = math.sinh(math.atanh(math.sin(phi)) - e * math.atanh(e * math.sin(phi)))
    xi_ = math.atan2(t, math.cos(lam))
    eta_ = math.atanh(math.sin(lam) / math.sqrt(1 + t * t))
    xi = xi_ + sum(
        a * math.sin(2 * j * xi_) * math.cosh(2 * j * eta_) for j, a in enumerate(alpha, 1)
    )
    eta = eta_ + sum(
        a * math.cos(2 * j * xi_) * math.sinh(2 * j * eta_) for j, a in enumerate(alpha, 1)
    )
    return false_easting + k0 * big_a * eta, k0 * big_a * xi


def to_da_nang_tm3(lon: float, lat: float) -> tuple[float, float]:
    return transverse_mercator(*wgs84_to_vn2000_geodetic(lon, lat), lon0=107.75, k0=0.9999)


def to_utm_49n(lon: float, lat: float) -> tuple[float, float]:
    """VN-2000 / UTM zone 49N (EPSG:3406)."""
    return transverse_mercator(*wgs84_to_vn2000_geodetic(lon, lat), lon0=111.0, k0=0.9996)
