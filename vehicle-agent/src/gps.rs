//! GPS inputs: NMEA 0183 sentences from a receiver (serial device or log file) and the gpsd
//! daemon's JSON protocol. Both are sans-IO machines fed one line at a time that give back
//! complete fixes; the sources in `sources.rs` own the file, device and socket.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime};
use futures::StreamExt;
use relay_proto::model::{FixQuality, Frame, Location, frame::Payload};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use crate::framer::SequenceCounter;

/// Longest line either input accepts (NMEA allows 82 characters; gpsd's SKY reports with many
/// satellites run to a few kilobytes). A longer line is discarded, not buffered.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

const KNOT_MPS: f64 = 1852.0 / 3600.0;

/// A fix as the receiver reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fix {
    /// Position, motion, quality and accuracy.
    pub location: Location,
    /// Seconds since midnight UTC of the fix, when the receiver said (paces a log replay).
    pub time_of_day: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
/// Why a line was not used.
pub enum GpsLineError {
    #[error("NMEA: {0}")]
    /// A sentence that does not parse (bad checksum, bad field).
    Nmea(String),
    #[error("gpsd: {0}")]
    /// A gpsd report that is not the documented JSON.
    Gpsd(String),
}

/// Fields of one epoch (all sentences with the same UTC time) gathered so far.
#[derive(Debug, Default, Clone)]
struct Epoch {
    time: Option<NaiveTime>,
    lat: Option<f64>,
    lon: Option<f64>,
    altitude: Option<f64>,
    speed_knots: Option<f64>,
    course: Option<f64>,
    gga_fix: Option<nmea::sentences::FixType>,
    rmc_valid: Option<bool>,
    gsa_mode: Option<nmea::sentences::gsa::GsaMode2>,
    satellites: Option<u32>,
    hdop: Option<f64>,
    lat_sd: Option<f64>,
    lon_sd: Option<f64>,
    alt_sd: Option<f64>,
}

/// Assembles NMEA sentences into fixes: GGA (position, altitude, fix type, satellites, HDOP),
/// RMC (position, speed, course, date, validity), VTG (speed, course), GSA (2D/3D, HDOP) and
/// GST (error estimates) of one UTC time make one fix, given back when the next time begins
/// (or on [`NmeaAssembler::finish`]). Receivers send an epoch's sentences in their own order;
/// sentences without a time (VTG, GSA) belong to the epoch being gathered.
#[derive(Debug, Default)]
pub struct NmeaAssembler {
    epoch: Epoch,
    date: Option<NaiveDate>,
}

/// A line without surrounding whitespace; `None` when blank, an error past [`MAX_LINE_BYTES`].
fn content(line: &str) -> Result<Option<&str>, String> {
    let line = line.trim();
    if line.len() > MAX_LINE_BYTES {
        return Err("line too long".into());
    }
    Ok((!line.is_empty()).then_some(line))
}

fn f(v: Option<f32>) -> Option<f64> {
    v.map(f64::from).filter(|v| v.is_finite())
}

impl NmeaAssembler {
    /// A fresh assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line. Blank lines and sentences of other types are ignored (`Ok(None)`).
    pub fn push_line(&mut self, line: &str) -> Result<Option<Fix>, GpsLineError> {
        let Some(line) = content(line).map_err(GpsLineError::Nmea)? else {
            return Ok(None);
        };
        use nmea::ParseResult as P;
        let parsed = match nmea::parse_str(line) {
            Ok(p) => p,
            // Sentence types this input does not use (GSV, GLL, proprietary ones...).
            Err(
                nmea::Error::Unsupported(_)
                | nmea::Error::Unknown(_)
                | nmea::Error::DisabledSentence,
            ) => return Ok(None),
            Err(e) => return Err(GpsLineError::Nmea(e.to_string())),
        };
        let time = match &parsed {
            P::GGA(g) => g.fix_time,
            P::RMC(r) => r.fix_time,
            P::GST(g) => g.time,
            _ => None,
        };
        let mut done = None;
        if let Some(t) = time
            && self.epoch.time.is_some_and(|cur| cur != t)
        {
            done = self.take();
        }
        let e = &mut self.epoch;
        if time.is_some() {
            e.time = time;
        }
        match parsed {
            P::GGA(g) => {
                e.lat = g.latitude.or(e.lat);
                e.lon = g.longitude.or(e.lon);
                e.altitude = f(g.altitude).or(e.altitude);
                e.gga_fix = g.fix_type.or(e.gga_fix);
                e.satellites = g.fix_satellites.or(e.satellites);
                e.hdop = f(g.hdop).or(e.hdop);
            }
            P::RMC(r) => {
                e.lat = e.lat.or(r.lat);
                e.lon = e.lon.or(r.lon);
                e.speed_knots = f(r.speed_over_ground).or(e.speed_knots);
                e.course = f(r.true_course).or(e.course);
                e.rmc_valid =
                    Some(r.status_of_fix != nmea::sentences::rmc::RmcStatusOfFix::Invalid);
                self.date = r.fix_date.or(self.date);
            }
            P::VTG(v) => {
                e.speed_knots = e.speed_knots.or(f(v.speed_over_ground));
                e.course = e.course.or(f(v.true_course));
            }
            P::GSA(g) => {
                e.gsa_mode = Some(g.mode2);
                e.hdop = e.hdop.or(f(g.hdop));
            }
            P::GST(g) => {
                e.lat_sd = f(g.lat_sd);
                e.lon_sd = f(g.long_sd);
                e.alt_sd = f(g.alt_sd);
            }
            _ => {}
        }
        Ok(done)
    }

    /// The fix being gathered, if it has a position (end of input).
    pub fn finish(&mut self) -> Option<Fix> {
        self.take()
    }

    fn take(&mut self) -> Option<Fix> {
        let e = std::mem::take(&mut self.epoch);
        let (Some(lat), Some(lon)) = (e.lat, e.lon) else {
            return None;
        };
        use nmea::sentences::{FixType as T, gsa::GsaMode2 as M};
        let valid = e.rmc_valid.unwrap_or(true);
        let fix_quality = match (e.gga_fix, e.gsa_mode) {
            _ if !valid => FixQuality::None,
            (Some(T::Invalid), _) | (_, Some(M::NoFix)) => FixQuality::None,
            (Some(T::DGps), _) => FixQuality::Dgps,
            (Some(T::Rtk | T::FloatRtk), _) => FixQuality::Rtk,
            // Dead reckoning, manual input and simulators are not a satellite fix.
            (Some(T::Estimated | T::Manual | T::Simulation), _) => FixQuality::None,
            (_, Some(M::Fix2D)) => FixQuality::Fix2d,
            (_, Some(M::Fix3D)) => FixQuality::Fix3d,
            (Some(T::Gps | T::Pps), None) => {
                if e.altitude.is_some() {
                    FixQuality::Fix3d
                } else {
                    FixQuality::Fix2d
                }
            }
            (None, None) => FixQuality::Unspecified,
        };
        let horizontal = match (e.lat_sd, e.lon_sd) {
            (Some(a), Some(b)) => (a * a + b * b).sqrt(),
            _ => 0.0,
        };
        let fix_time_ns = match (self.date, e.time) {
            (Some(d), Some(t)) => d
                .and_time(t)
                .and_utc()
                .timestamp_nanos_opt()
                .unwrap_or_default(),
            _ => 0,
        };
        Some(Fix {
            location: Location {
                latitude_deg: lat,
                longitude_deg: lon,
                altitude_m: e.altitude.unwrap_or(0.0),
                speed_mps: e.speed_knots.map_or(0.0, |k| k.max(0.0) * KNOT_MPS),
                heading_deg: e.course.map_or(0.0, |c| c.rem_euclid(360.0)),
                fix_quality: fix_quality as i32,
                horizontal_accuracy_m: horizontal,
                satellites: e.satellites.unwrap_or(0),
                vertical_accuracy_m: e.alt_sd.unwrap_or(0.0).max(0.0),
                speed_accuracy_mps: 0.0,
                hdop: e.hdop.unwrap_or(0.0).max(0.0),
                fix_time_ns,
            },
            time_of_day: e.time.map(|t| {
                use chrono::Timelike;
                f64::from(t.num_seconds_from_midnight()) + f64::from(t.nanosecond()) / 1e9
            }),
        })
    }
}

/// The `?WATCH` command that makes gpsd stream JSON reports.
pub const GPSD_WATCH: &str = "?WATCH={\"enable\":true,\"json\":true};\n";

#[derive(Debug, Deserialize)]
struct Report {
    class: String,
}

/// A TPV ("time-position-velocity") report; every field but `class` is optional in gpsd.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tpv {
    mode: Option<u8>,
    status: Option<u8>,
    time: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    #[serde(rename = "altMSL")]
    alt_msl: Option<f64>,
    alt: Option<f64>,
    #[serde(rename = "altHAE")]
    alt_hae: Option<f64>,
    speed: Option<f64>,
    track: Option<f64>,
    eph: Option<f64>,
    epx: Option<f64>,
    epy: Option<f64>,
    epv: Option<f64>,
    eps: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sky {
    u_sat: Option<u32>,
    hdop: Option<f64>,
    satellites: Option<Vec<SkySatellite>>,
}

#[derive(Debug, Default, Deserialize)]
struct SkySatellite {
    used: Option<bool>,
}

/// Turns gpsd's JSON reports into fixes: each TPV with a position is one fix; satellites used
/// and HDOP come from the latest SKY report. VERSION, DEVICES, WATCH and other classes are
/// taken and ignored.
#[derive(Debug, Default)]
pub struct GpsdReports {
    satellites: u32,
    hdop: f64,
    /// TPV reports without a position (no fix yet), for the logs.
    pub without_position: u64,
}

fn nonneg(v: Option<f64>) -> f64 {
    v.filter(|v| v.is_finite() && *v >= 0.0).unwrap_or(0.0)
}

impl GpsdReports {
    /// A fresh reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line of gpsd output.
    pub fn push_line(&mut self, line: &str) -> Result<Option<Fix>, GpsLineError> {
        let Some(line) = content(line).map_err(GpsLineError::Gpsd)? else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| GpsLineError::Gpsd(e.to_string());
        let report: Report = serde_json::from_str(line).map_err(bad)?;
        match report.class.as_str() {
            "SKY" => {
                let sky: Sky = serde_json::from_str(line).map_err(bad)?;
                let used = sky.u_sat.or_else(|| {
                    sky.satellites
                        .as_ref()
                        .map(|s| s.iter().filter(|s| s.used == Some(true)).count() as u32)
                });
                if let Some(n) = used {
                    self.satellites = n;
                }
                if let Some(h) = sky.hdop.filter(|h| h.is_finite() && *h >= 0.0) {
                    self.hdop = h;
                }
                Ok(None)
            }
            "TPV" => {
                let tpv: Tpv = serde_json::from_str(line).map_err(bad)?;
                let (Some(lat), Some(lon)) = (tpv.lat, tpv.lon) else {
                    self.without_position += 1;
                    return Ok(None);
                };
                if !(lat.is_finite() && lon.is_finite()) {
                    return Err(GpsLineError::Gpsd("position not a number".into()));
                }
                // gpsd: mode 0 unknown, 1 no fix, 2 2D, 3 3D; status 2 DGPS, 3/4 RTK.
                let fix_quality = match (tpv.mode, tpv.status) {
                    (Some(0 | 1), _) => FixQuality::None,
                    (Some(2 | 3), Some(2)) => FixQuality::Dgps,
                    (Some(2 | 3), Some(3 | 4)) => FixQuality::Rtk,
                    (Some(2), _) => FixQuality::Fix2d,
                    (Some(3), _) => FixQuality::Fix3d,
                    _ => FixQuality::Unspecified,
                };
                let horizontal = match (tpv.eph, tpv.epx, tpv.epy) {
                    (Some(h), _, _) => nonneg(Some(h)),
                    (None, Some(x), Some(y)) => nonneg(Some((x * x + y * y).sqrt())),
                    _ => 0.0,
                };
                let time = tpv
                    .time
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
                Ok(Some(Fix {
                    location: Location {
                        latitude_deg: lat,
                        longitude_deg: lon,
                        altitude_m: tpv
                            .alt_msl
                            .or(tpv.alt)
                            .or(tpv.alt_hae)
                            .filter(|a| a.is_finite())
                            .unwrap_or(0.0),
                        speed_mps: nonneg(tpv.speed),
                        heading_deg: tpv
                            .track
                            .filter(|t| t.is_finite())
                            .map_or(0.0, |t| t.rem_euclid(360.0)),
                        fix_quality: fix_quality as i32,
                        horizontal_accuracy_m: horizontal,
                        satellites: self.satellites,
                        vertical_accuracy_m: nonneg(tpv.epv),
                        speed_accuracy_mps: nonneg(tpv.eps),
                        hdop: self.hdop,
                        fix_time_ns: time
                            .and_then(|t| t.timestamp_nanos_opt())
                            .unwrap_or_default(),
                    },
                    time_of_day: None,
                }))
            }
            _ => Ok(None),
        }
    }
}

/// Which GPS input, for logs and metric labels.
#[derive(Debug, Clone, Copy)]
pub enum Input {
    /// NMEA sentences.
    Nmea,
    /// gpsd reports.
    Gpsd,
}

impl Input {
    fn label(self) -> &'static str {
        match self {
            Input::Nmea => "nmea",
            Input::Gpsd => "gpsd",
        }
    }
}

/// Counts a line by input and outcome (fix, ignored, invalid): bounded labels.
fn count_line(input: Input, result: &'static str) {
    metrics::counter!("relay_agent_gps_lines_total", "input" => input.label(), "result" => result)
        .increment(1);
}

/// Where a GPS input's fixes go: numbered location frames, stamped on the vehicle clock when
/// the fix arrived (the receiver's own time travels in `fix_time_ns`).
pub struct FixSink<'a> {
    seq: SequenceCounter,
    tx: &'a mpsc::Sender<Frame>,
    epoch_ns: i64,
    start: Instant,
    /// Frames sent.
    pub produced: u64,
}

impl<'a> FixSink<'a> {
    /// Frames of stream `stream_id` into `tx`; `epoch_ns` is the capture time at `start`.
    pub fn new(stream_id: u32, tx: &'a mpsc::Sender<Frame>, epoch_ns: i64) -> Self {
        Self {
            seq: SequenceCounter::new(stream_id),
            tx,
            epoch_ns,
            start: Instant::now(),
            produced: 0,
        }
    }

    /// Sends one fix; false when the uplink is gone.
    pub async fn send(&mut self, fix: Fix) -> bool {
        let elapsed = i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX);
        let frame = self.seq.frame(
            self.epoch_ns.saturating_add(elapsed),
            Payload::Location(fix.location),
        );
        if self.tx.send(frame).await.is_err() {
            return false;
        }
        metrics::counter!("relay_agent_frames_produced_total", "kind" => "location").increment(1);
        self.produced += 1;
        true
    }
}

/// Bounded lines of an input. A line over [`MAX_LINE_BYTES`] is reported and skipped up to
/// its end, and reading goes on (a receiver at the wrong baud rate sends noise without line
/// breaks); a read error ends the input like its end does. After such a line the reader
/// decodes what it already holds only once more bytes arrive: a GPS input sends every second.
struct Lines<R> {
    inner: FramedRead<R, LinesCodec>,
    /// The codec's error was just returned: the reader's next `None` is not the end.
    after_error: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> Lines<R> {
    fn new(reader: R) -> Self {
        Self {
            inner: FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE_BYTES)),
            after_error: false,
        }
    }

    async fn next(&mut self) -> Option<Result<String, String>> {
        loop {
            match self.inner.next().await {
                Some(Ok(line)) => return Some(Ok(line)),
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    self.after_error = true;
                    return Some(Err("line too long".into()));
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    tracing::warn!(error = %e, "GPS input read failed");
                    return None;
                }
                None if std::mem::take(&mut self.after_error) => {}
                None => return None,
            }
        }
    }
}

/// How an NMEA file is read.
#[derive(Debug, Clone, Copy)]
pub struct NmeaReplay {
    /// Pace a log by its fix times (divided by `speed`) instead of reading lines as they come.
    pub paced: bool,
    /// Replay speed factor.
    pub speed: f64,
    /// Start the log again at its end.
    pub looping: bool,
}

/// Reads NMEA sentences from `path` (a serial device or a log file) until `stop` fires or a
/// log not looped ends. A device or file that cannot be opened, and a device that ends
/// (unplugged), is opened again with back-off.
pub async fn run_nmea(
    path: &Path,
    replay: NmeaReplay,
    sink: &mut FixSink<'_>,
    stop: &CancellationToken,
) {
    let mut backoff = RETRY_MIN;
    loop {
        let file = tokio::select! {
            f = tokio::fs::File::open(path) => f,
            () = stop.cancelled() => return,
        };
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open NMEA input; retrying");
                if !pause(&mut backoff, stop).await {
                    return;
                }
                continue;
            }
        };
        let device = {
            use std::os::unix::fs::FileTypeExt;
            file.metadata()
                .await
                .is_ok_and(|m| m.file_type().is_char_device())
        };
        backoff = RETRY_MIN;
        let mut input = Lines::new(file);
        let mut nmea = NmeaAssembler::new();
        // Log time of the first fix and when it was sent, for pacing.
        let mut origin: Option<(f64, Instant)> = None;
        let mut last_tod = 0.0;
        let mut day_offset = 0.0;
        loop {
            let next = tokio::select! {
                l = input.next() => l,
                () = stop.cancelled() => return,
            };
            let fix = match next {
                Some(Ok(line)) => match nmea.push_line(&line) {
                    Ok(f) => f,
                    Err(e) => {
                        count_line(Input::Nmea, "invalid");
                        tracing::debug!(error = %e, "NMEA sentence refused");
                        continue;
                    }
                },
                Some(Err(e)) => {
                    count_line(Input::Nmea, "invalid");
                    tracing::debug!(error = %e, "NMEA line refused");
                    continue;
                }
                None => match nmea.finish() {
                    Some(f) => Some(f),
                    None => break,
                },
            };
            let Some(fix) = fix else {
                count_line(Input::Nmea, "ignored");
                continue;
            };
            count_line(Input::Nmea, "fix");
            if replay.paced
                && let Some(tod) = fix.time_of_day
            {
                // A log crossing midnight UTC keeps counting.
                if tod + 43_200.0 < last_tod {
                    day_offset += 86_400.0;
                }
                last_tod = tod;
                let t = tod + day_offset;
                let (t0, started) = *origin.get_or_insert((t, Instant::now()));
                let due = started + Duration::from_secs_f64(((t - t0) / replay.speed).max(0.0));
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = stop.cancelled() => return,
                }
            }
            if !sink.send(fix).await {
                return;
            }
        }
        if device {
            tracing::warn!(path = %path.display(), "NMEA device ended; opening it again");
            if !pause(&mut backoff, stop).await {
                return;
            }
        } else if !replay.looping {
            return;
        }
    }
}

/// Connects to gpsd at `address`, asks for JSON reports and sends a fix per TPV with a
/// position until `stop` fires; reconnects with back-off when gpsd goes away.
pub async fn run_gpsd(address: SocketAddr, sink: &mut FixSink<'_>, stop: &CancellationToken) {
    let mut backoff = RETRY_MIN;
    loop {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address));
        let stream = tokio::select! {
            s = connect => s,
            () = stop.cancelled() => return,
        };
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%address, error = %e, "cannot reach gpsd; retrying");
                if !pause(&mut backoff, stop).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                tracing::warn!(%address, "gpsd connection timed out; retrying");
                if !pause(&mut backoff, stop).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = stream.write_all(GPSD_WATCH.as_bytes()).await {
            tracing::warn!(%address, error = %e, "gpsd refused ?WATCH; retrying");
            if !pause(&mut backoff, stop).await {
                return;
            }
            continue;
        }
        tracing::info!(%address, "reading gpsd");
        let mut reports = GpsdReports::new();
        let mut input = Lines::new(stream);
        loop {
            // gpsd reports at least once a second while a receiver is attached; silence
            // this long means a dead connection.
            let next = tokio::select! {
                l = tokio::time::timeout(GPSD_SILENCE, input.next()) => l,
                () = stop.cancelled() => return,
            };
            match next {
                Ok(Some(Ok(line))) => match reports.push_line(&line) {
                    Ok(Some(fix)) => {
                        count_line(Input::Gpsd, "fix");
                        backoff = RETRY_MIN;
                        if !sink.send(fix).await {
                            return;
                        }
                    }
                    Ok(None) => count_line(Input::Gpsd, "ignored"),
                    Err(e) => {
                        count_line(Input::Gpsd, "invalid");
                        tracing::debug!(error = %e, "gpsd report refused");
                    }
                },
                Ok(Some(Err(e))) => {
                    count_line(Input::Gpsd, "invalid");
                    tracing::debug!(error = %e, "gpsd line refused");
                }
                Ok(None) => {
                    tracing::warn!(%address, "gpsd closed the connection; reconnecting");
                    break;
                }
                Err(_) => {
                    tracing::warn!(%address, "gpsd silent for {GPSD_SILENCE:?}; reconnecting");
                    break;
                }
            }
        }
        if !pause(&mut backoff, stop).await {
            return;
        }
    }
}

/// First and longest wait before another attempt to open an input.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// A TCP connection to gpsd must be up within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// gpsd silent this long: the connection is taken as dead.
const GPSD_SILENCE: Duration = Duration::from_secs(30);

/// Waits `backoff` (doubling it up to [`RETRY_MAX`]); false if `stop` fired.
async fn pause(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(RETRY_MAX);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // A u-blox receiver's epoch (checksums as the receiver wrote them).
    const EPOCH: &[&str] = &[
        "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A",
        "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47",
        "$GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1*39",
        "$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48",
    ];

    #[test]
    fn one_epoch_of_sentences_makes_one_fix() {
        let mut a = NmeaAssembler::new();
        for l in EPOCH {
            assert_eq!(a.push_line(l).unwrap(), None, "{l}");
        }
        let fix = a.finish().unwrap();
        let l = &fix.location;
        assert!((l.latitude_deg - (48.0 + 7.038 / 60.0)).abs() < 1e-9);
        assert!((l.longitude_deg - (11.0 + 31.0 / 60.0)).abs() < 1e-9);
        assert_eq!(l.altitude_m, 545.4f32 as f64);
        // RMC's 22.4 kn wins over VTG's 5.5 kn: it carries the epoch's time.
        assert!((l.speed_mps - 22.4f32 as f64 * KNOT_MPS).abs() < 1e-9);
        assert_eq!(l.heading_deg, 84.4f32 as f64);
        assert_eq!(l.fix_quality, FixQuality::Fix3d as i32);
        assert_eq!(l.satellites, 8);
        assert_eq!(l.hdop, 0.9f32 as f64);
        assert_eq!(l.fix_time_ns, 764_426_119_000_000_000); // 1994-03-23T12:35:19Z
        assert_eq!(fix.time_of_day, Some(12.0 * 3600.0 + 35.0 * 60.0 + 19.0));
    }

    #[test]
    fn a_new_time_closes_the_epoch_and_invalid_input_is_an_error() {
        let mut a = NmeaAssembler::new();
        a.push_line(EPOCH[1]).unwrap();
        let next = "$GPGGA,123520,4807.038,N,01131.000,E,2,09,0.9,545.4,M,46.9,M,,*4F";
        let fix = a.push_line(next).unwrap().expect("the first epoch");
        assert_eq!(fix.location.satellites, 8);
        assert_eq!(fix.location.fix_time_ns, 0, "no date without RMC");
        let fix = a.finish().unwrap();
        assert_eq!(fix.location.fix_quality, FixQuality::Dgps as i32);
        let bad_checksum = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48";
        assert!(matches!(
            a.push_line(bad_checksum),
            Err(GpsLineError::Nmea(_))
        ));
        assert_eq!(
            a.push_line("$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74")
                .unwrap(),
            None
        );
        assert!(a.push_line("garbage").is_err());
        assert!(a.push_line(&"$".repeat(MAX_LINE_BYTES + 1)).is_err());
        assert_eq!(a.finish(), None, "nothing gathered");
    }

    #[tokio::test]
    async fn a_line_over_the_bound_is_skipped_and_reading_goes_on() {
        let mut text = "x".repeat(MAX_LINE_BYTES + 10);
        text.push_str("\nnext\n");
        let mut lines = Lines::new(text.as_bytes());
        assert_eq!(lines.next().await, Some(Err("line too long".into())));
        assert_eq!(lines.next().await, Some(Ok("next".into())));
        assert_eq!(lines.next().await, None);
    }

    #[test]
    fn a_void_rmc_is_no_fix() {
        let mut a = NmeaAssembler::new();
        a.push_line("$GPRMC,123519,V,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*7D")
            .unwrap();
        assert_eq!(
            a.finish().unwrap().location.fix_quality,
            FixQuality::None as i32
        );
    }

    #[test]
    fn gpsd_tpv_and_sky_make_a_fix() {
        let mut g = GpsdReports::new();
        for l in [
            r#"{"class":"VERSION","release":"3.25","rev":"3.25","proto_major":3,"proto_minor":15}"#,
            r#"{"class":"SKY","device":"/dev/ttyACM0","hdop":0.8,"satellites":[{"PRN":5,"used":true},{"PRN":7,"used":false},{"PRN":9,"used":true}]}"#,
        ] {
            assert_eq!(g.push_line(l).unwrap(), None);
        }
        let tpv = r#"{"class":"TPV","device":"/dev/ttyACM0","mode":3,"status":2,"time":"2026-11-29T10:00:01.000Z","lat":52.52,"lon":13.405,"altMSL":34.5,"speed":13.9,"track":271.0,"eph":4.2,"epv":6.1,"eps":0.4}"#;
        let fix = g.push_line(tpv).unwrap().unwrap().location;
        assert_eq!(
            (fix.latitude_deg, fix.longitude_deg, fix.altitude_m),
            (52.52, 13.405, 34.5)
        );
        assert_eq!((fix.speed_mps, fix.heading_deg), (13.9, 271.0));
        assert_eq!(fix.fix_quality, FixQuality::Dgps as i32);
        assert_eq!(
            (
                fix.horizontal_accuracy_m,
                fix.vertical_accuracy_m,
                fix.speed_accuracy_mps
            ),
            (4.2, 6.1, 0.4)
        );
        assert_eq!((fix.satellites, fix.hdop), (2, 0.8));
        assert_eq!(fix.fix_time_ns, 1_795_946_401_000_000_000);
        // No position yet: counted, not a fix; a report that is not JSON is an error.
        assert_eq!(g.push_line(r#"{"class":"TPV","mode":1}"#).unwrap(), None);
        assert_eq!(g.without_position, 1);
        assert!(g.push_line("{not json").is_err());
        assert!(g.push_line(r#"{"class":"TPV","lat":"north"}"#).is_err());
    }

    #[test]
    fn the_shipped_drive_log_gives_a_fix_per_epoch_with_a_position() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gps/drive.nmea");
        let text = std::fs::read_to_string(path).unwrap();
        let mut a = NmeaAssembler::new();
        let (mut fixes, mut errors) = (Vec::new(), Vec::new());
        for line in text.lines() {
            match a.push_line(line) {
                Ok(Some(f)) => fixes.push(f),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        fixes.extend(a.finish());
        // 90 epochs, 6 of them in a tunnel without a position; a broken checksum and a
        // truncated line refused.
        assert_eq!(fixes.len(), 84, "{errors:?}");
        assert_eq!(errors.len(), 2, "{errors:?}");
        let q = |k: usize| FixQuality::try_from(fixes[k].location.fix_quality).unwrap();
        assert_eq!(q(0), FixQuality::Fix3d);
        assert_eq!(q(30), FixQuality::None, "dead reckoning after the tunnel");
        assert_eq!(q(50 - 6), FixQuality::Dgps);
        assert_eq!(q(70 - 6), FixQuality::Fix2d);
        assert!(fixes.iter().all(|f| f.location.horizontal_accuracy_m > 1.0));
    }
}
