"""A small integration engine for the HL7 feed test, built on the Python `hl7` package (an HL7
v2 parser and MLLP implementation nobody here wrote).

Usage: receiver.py PORT LOG [--die-after N] [--ack-delay SECONDS] [--tls CERT KEY]

Accepts MLLP connections on 127.0.0.1:PORT. Each message is parsed with `hl7.parse`, checked
(ORU^R01, the PCD-01 profile in MSH-21, segment order MSH PID OBR OBX...), summarised as one JSON
line appended to LOG (flushed and fsynced) and only then acknowledged with the package's
`create_ack` (AA). A message that fails the checks gets AE and is not logged. With --die-after N
the process exits at once, without logging or acknowledging, when message N+1 arrives: a
receiver killed mid-stream holding an unacknowledged message. With --ack-delay it waits that
long between logging a message and acknowledging it (a slow engine: a feed stopped meanwhile
must still take the answer). With --tls it speaks MLLP over
TLS with that certificate and key (PEM).
"""

import argparse
import asyncio
import json
import os
import ssl
import sys

import hl7
import hl7.mllp

PROFILE = "IHE_PCD_001"


def summarise(msg):
    msh = msg.segment("MSH")
    if str(msh[9]) != "ORU^R01^ORU_R01":
        raise ValueError(f"message type {msh[9]}")
    if str(msh[21][0][0]) != PROFILE:
        raise ValueError(f"MSH-21 {msh[21]}")
    names = [str(seg[0]) for seg in msg]
    if names[:3] != ["MSH", "PID", "OBR"] or any(n != "OBX" for n in names[3:]):
        raise ValueError(f"segments {names}")
    numerics, waves = [], []
    for obx in msg.segments("OBX"):
        kind = str(obx[2])
        ident = obx[3][0]
        codes = {str(ident[2]): str(ident[0])}
        if len(ident) >= 6:
            codes[str(ident[5])] = str(ident[3])
        unit = obx[6][0]
        if kind == "NM" and str(ident[1]) == "MDC_ATTR_SAMP_RATE":
            waves[-1]["rate"] = float(str(obx[5]))
        elif kind == "NM":
            numerics.append({"codes": codes, "value": float(str(obx[5])), "unit": str(unit[0]),
                             "unit_system": str(unit[2])})
        elif kind == "NA":
            values = [str(c) for c in obx[5][0]]
            waves.append({"codes": codes, "name": str(ident[1]), "unit": str(unit[0]),
                          "values": [float(v) if v else None for v in values]})
    return {"control_id": str(msh[10]), "patient": str(msg.segment("PID")[3][0][0]),
            "numerics": numerics, "waves": waves}


async def main(port, log, die_after, ack_delay, tls):
    received = 0

    async def handle(reader, writer):
        nonlocal received
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                received += 1
                if die_after is not None and received > die_after:
                    os._exit(3)
                try:
                    line = json.dumps(summarise(msg))
                except Exception as e:  # noqa: BLE001 - any check failure is a NAK
                    writer.writemessage(msg.create_ack(ack_code="AE"))
                    await writer.drain()
                    print(f"refused: {e}", file=sys.stderr, flush=True)
                    continue
                with open(log, "a") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                if ack_delay:
                    await asyncio.sleep(ack_delay)
                writer.writemessage(msg.create_ack(ack_code="AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tls[0], tls[1])
    server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", port, ssl=context)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("port", type=int)
    args.add_argument("log")
    args.add_argument("--die-after", type=int)
    args.add_argument("--ack-delay", type=float, default=0.0)
    args.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    a = args.parse_args()
    asyncio.run(main(a.port, a.log, a.die_after, a.ack_delay, a.tls))
