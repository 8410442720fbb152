"""Writes drive.nmea: a 90 s NMEA 0183 log of an ambulance run through Berlin, as a u-blox
receiver at 1 Hz reports it (RMC, VTG, GGA, GSA, GSV, GST per epoch; GN talker), with what real
logs hold: a tunnel (no fix, empty fields), dead reckoning after it (GGA quality 6, RMC 'V'),
a DGPS stretch, a 2D stretch, a sentence with a broken checksum and a truncated line.
Synthetic (no recorded log is shipped with a licence that allows it); deterministic.
Run: python3 make_drive_log.py > drive.nmea
"""
import math


def cks(body):
    c = 0
    for ch in body:
        c ^= ord(ch)
    return f"${body}*{c:02X}"


def latlon(lat, lon):
    la, lo = abs(lat), abs(lon)
    lat_s = f"{int(la):02d}{(la - int(la)) * 60:08.5f},{'N' if lat >= 0 else 'S'}"
    lon_s = f"{int(lo):03d}{(lo - int(lo)) * 60:08.5f},{'E' if lon >= 0 else 'W'}"
    return lat_s, lon_s


def main():
    lat, lon = 52.52000, 13.40500
    out = []
    for k in range(90):
        t = f"{10 + (k // 3600):02d}{(k // 60) % 60:02d}{k % 60:02d}.00"
        heading = (45.0 + 40.0 * math.sin(k / 15.0)) % 360.0
        speed = 8.0 + 6.0 * (1 + math.sin(k / 9.0))  # m/s
        lat += speed * math.cos(math.radians(heading)) / 111_320.0
        lon += speed * math.sin(math.radians(heading)) / (111_320.0 * math.cos(math.radians(lat)))
        knots = speed / (1852.0 / 3600.0)
        la, lo = latlon(lat, lon)
        tunnel = 30 <= k < 36
        dead_reckoning = 36 <= k < 39
        dgps = 50 <= k < 60
        two_d = 70 <= k < 75
        sats = 4 if two_d else 7 + (k % 5)
        hdop = 2.8 if two_d else 0.7 + (k % 4) / 10
        alt = 34.0 + (k % 7) * 0.5
        date = "291126"
        if tunnel:
            out.append(cks(f"GNRMC,{t},V,,,,,,,{date},,,N,V"))
            out.append(cks("GNVTG,,T,,M,,N,,K,N"))
            out.append(cks(f"GNGGA,{t},,,,,0,00,99.99,,,,,,"))
            out.append(cks("GNGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99,1"))
            continue
        quality = 6 if dead_reckoning else (2 if dgps else 1)
        status = "V" if dead_reckoning else "A"
        mode = "E" if dead_reckoning else ("D" if dgps else "A")
        out.append(cks(f"GNRMC,{t},{status},{la},{lo},{knots:.3f},{heading:.2f},{date},,,{mode},V"))
        out.append(cks(f"GNVTG,{heading:.2f},T,,M,{knots:.3f},N,{speed * 3.6:.3f},K,{mode}"))
        gga_alt = "" if two_d else f"{alt:.1f}"
        out.append(cks(f"GNGGA,{t},{la},{lo},{quality},{sats:02d},{hdop:.2f},{gga_alt},M,44.5,M,,"))
        prns = ",".join(f"{p:02d}" for p in range(2, 2 + sats)) + "," * (12 - sats)
        out.append(cks(f"GNGSA,A,{2 if two_d else 3},{prns},{hdop + 0.6:.2f},{hdop:.2f},{hdop + 0.9:.2f},1"))
        out.append(cks("GPGSV,3,1,11,02,41,089,38,03,12,315,24,05,66,194,44,07,23,045,31,1"))
        out.append(cks(f"GNGST,{t},11,{1.5 + hdop:.1f},{1.0 + hdop:.1f},35.0,{1.2 + hdop / 2:.2f},{1.1 + hdop / 2:.2f},{2.5 + hdop:.2f}"))
        if k == 12:
            good = cks(f"GNGGA,{t},{la},{lo},1,{sats:02d},{hdop:.2f},{alt:.1f},M,44.5,M,,")
            out.append(good[:-2] + ("00" if good[-2:] != "00" else "11"))  # broken checksum
        if k == 20:
            out.append("$GNGGA,1000")  # truncated by a serial buffer overrun
    print("\r\n".join(out), end="\r\n")


main()
