//! IHE PCD-01 (Communicate PCD Data) `ORU^R01` messages: numerics (`NM` OBX) and waveforms
//! (`NA` OBX per channel, IHE PCD Waveform Content Module), acknowledgements, escaping.

use hl7_parser::Message;
use hl7_parser::message::{Field, Segment, Separators};

/// MSH-21 of IHE PCD-01 messages.
pub const PCD01_PROFILE: &str = "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO";
/// MDC code of the sample-rate attribute (MDC_ATTR_SAMP_RATE).
pub const MDC_ATTR_SAMP_RATE: u32 = 67_981;
/// MDC code of the measurement-resolution attribute (MDC_ATTR_NU_MSMT_RES).
pub const MDC_ATTR_NU_MSMT_RES: u32 = 68_193;
/// Samples in one `NA` value at most (a 10 s chunk at 1 kHz is 10,000).
pub const MAX_SAMPLES_PER_CHANNEL: usize = 100_000;

/// A numeric observation (vital sign).
#[derive(Debug, Clone, PartialEq)]
pub struct Numeric {
    /// IEEE 11073-10101 MDC code (OBX-3.1 when its coding system is MDC), 0 when not.
    pub mdc_code: u32,
    /// The observation's name as sent (OBX-3.2, e.g. `MDC_ECG_HEART_RATE`).
    pub label: String,
    /// Its value.
    pub value: f64,
    /// UCUM unit (OBX-6, MDC units translated where known).
    pub unit: String,
}

/// One waveform channel: an `NA` OBX and its attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveChannel {
    /// MDC code of the channel (e.g. 131330 MDC_ECG_LEAD_II), 0 when not MDC-coded.
    pub mdc_code: u32,
    /// The channel's name as sent (OBX-3.2).
    pub label: String,
    /// UCUM unit of the samples.
    pub unit: String,
    /// The samples, in the unit.
    pub samples: Vec<f64>,
    /// Samples per second (MDC_ATTR_SAMP_RATE below the channel), when sent.
    pub sample_rate_hz: Option<f64>,
    /// Smallest step of the samples in the unit (MDC_ATTR_NU_MSMT_RES), when sent.
    pub resolution: Option<f64>,
}

/// What one PCD-01 message holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Observations {
    /// MSH-10, echoed in the acknowledgement.
    pub control_id: String,
    /// MSH-3 and MSH-4 of the sender (the acknowledgement's receiver).
    pub sender: (String, String),
    /// MSH-21 as sent (the PCD-01 profile for conformant senders).
    pub profile: String,
    /// Numerics, in message order.
    pub numerics: Vec<Numeric>,
    /// Waveform channels, in message order.
    pub waveforms: Vec<WaveChannel>,
}

/// Why a message was refused; the text goes into the NAK.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Pcd01Error {
    /// Not HL7 v2 at all.
    #[error("not an HL7 v2 message: {0}")]
    Syntax(String),
    /// An HL7 message of another type.
    #[error("message type {0:?} is not ORU^R01")]
    Unsupported(String),
    /// A required field is empty.
    #[error("{0} is empty")]
    Missing(&'static str),
    /// A value that is not what its type says.
    #[error("OBX {index}: {what}")]
    BadObx {
        /// 1-based position of the OBX in the message.
        index: usize,
        /// What is wrong.
        what: String,
    },
}

fn field<'a>(seg: &'a Segment<'a>, n: usize) -> Option<&'a Field<'a>> {
    seg.field(n)
}

fn raw<'a>(seg: &'a Segment<'a>, n: usize) -> &'a str {
    field(seg, n).map_or("", |f| f.raw_value())
}

fn component<'a>(seg: &'a Segment<'a>, n: usize, c: usize) -> &'a str {
    field(seg, n)
        .and_then(|f| f.component(c))
        .map_or("", |c| c.raw_value())
}

fn decoded(sep: &Separators, v: &str) -> String {
    sep.decode(v).to_string()
}

/// UCUM for the MDC units monitors send (by their reference id), the text itself otherwise.
fn mdc_unit_to_ucum(text: &str) -> Option<&'static str> {
    Some(match text {
        "MDC_DIM_BEAT_PER_MIN" | "MDC_DIM_RESP_PER_MIN" | "MDC_DIM_PER_MIN" => "/min",
        "MDC_DIM_PERCENT" => "%",
        "MDC_DIM_MMHG" => "mm[Hg]",
        "MDC_DIM_KILO_PASCAL" => "kPa",
        "MDC_DIM_DEGC" => "Cel",
        "MDC_DIM_MILLI_VOLT" => "mV",
        "MDC_DIM_MICRO_VOLT" => "uV",
        "MDC_DIM_OHM" => "Ohm",
        "MDC_DIM_PER_SEC" | "MDC_DIM_SEC_PER" => "/s",
        "MDC_DIM_DIMLESS" => "1",
        _ => return None,
    })
}

fn unit(seg: &Segment<'_>, sep: &Separators) -> String {
    let (id, text, system) = (
        component(seg, 6, 1),
        component(seg, 6, 2),
        component(seg, 6, 3),
    );
    let pick = match system {
        "UCUM" => id,
        _ => mdc_unit_to_ucum(text).unwrap_or(if text.is_empty() { id } else { text }),
    };
    decoded(sep, pick)
}

fn code(seg: &Segment<'_>) -> u32 {
    let system = component(seg, 3, 3);
    if system.is_empty() || system == "MDC" {
        component(seg, 3, 1).parse().unwrap_or(0)
    } else {
        0
    }
}

/// Parses a PCD-01 `ORU^R01` message (segments separated by CR; LF tolerated).
pub fn parse_oru(text: &str) -> Result<Observations, Pcd01Error> {
    let msg = Message::parse_with_lenient_newlines(text, true)
        .map_err(|e| Pcd01Error::Syntax(e.to_string()))?;
    let sep = msg.separators;
    let msh = msg
        .segment("MSH")
        .ok_or_else(|| Pcd01Error::Syntax("no MSH segment".into()))?;
    let (kind, event) = (component(msh, 9, 1), component(msh, 9, 2));
    if (kind, event) != ("ORU", "R01") {
        return Err(Pcd01Error::Unsupported(raw(msh, 9).to_owned()));
    }
    let control_id = decoded(&sep, raw(msh, 10));
    if control_id.is_empty() {
        return Err(Pcd01Error::Missing("MSH-10 (message control id)"));
    }
    let mut out = Observations {
        control_id,
        sender: (decoded(&sep, raw(msh, 3)), decoded(&sep, raw(msh, 4))),
        profile: raw(msh, 21).to_owned(),
        numerics: Vec::new(),
        waveforms: Vec::new(),
    };
    // The OBX-4 sub-id of each channel: attributes below it start with it and a dot.
    let mut channel_ids: Vec<String> = Vec::new();
    for (i, seg) in msg.segments().filter(|s| s.name == "OBX").enumerate() {
        let index = i + 1;
        let bad = |what: String| Pcd01Error::BadObx { index, what };
        let value_type = raw(seg, 2);
        let sub_id = raw(seg, 4);
        let label = decoded(&sep, component(seg, 3, 2));
        match value_type {
            "NA" => {
                let values = field(seg, 5).map_or("", |f| f.raw_value());
                let samples = values
                    .split(sep.component)
                    .filter(|v| !v.is_empty())
                    .take(MAX_SAMPLES_PER_CHANNEL + 1)
                    .map(|v| v.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
                    .collect::<Option<Vec<f64>>>()
                    .ok_or_else(|| bad(format!("{label}: a sample is not a number")))?;
                if samples.len() > MAX_SAMPLES_PER_CHANNEL {
                    return Err(bad(format!(
                        "{label}: more than {MAX_SAMPLES_PER_CHANNEL} samples"
                    )));
                }
                out.waveforms.push(WaveChannel {
                    mdc_code: code(seg),
                    label,
                    unit: unit(seg, &sep),
                    samples,
                    sample_rate_hz: None,
                    resolution: None,
                });
                channel_ids.push(sub_id.to_owned());
            }
            "NM" => {
                let value = raw(seg, 5)
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        bad(format!("{label}: value {:?} is not a number", raw(seg, 5)))
                    })?;
                let mdc = code(seg);
                // An attribute of a channel: its sub-id continues the channel's.
                let owner = (!sub_id.is_empty())
                    .then(|| {
                        channel_ids.iter().rposition(|c| {
                            !c.is_empty()
                                && sub_id.len() > c.len()
                                && sub_id.starts_with(c.as_str())
                                && sub_id.as_bytes()[c.len()] == b'.'
                        })
                    })
                    .flatten();
                match owner {
                    Some(ch) => {
                        let ch = &mut out.waveforms[ch];
                        if mdc == MDC_ATTR_SAMP_RATE || label == "MDC_ATTR_SAMP_RATE" {
                            if value <= 0.0 {
                                return Err(bad(format!("sample rate {value}")));
                            }
                            ch.sample_rate_hz = Some(value);
                        } else if mdc == MDC_ATTR_NU_MSMT_RES || label == "MDC_ATTR_NU_MSMT_RES" {
                            if value <= 0.0 {
                                return Err(bad(format!("resolution {value}")));
                            }
                            ch.resolution = Some(value);
                        }
                        // Other attributes (data range, filters...) are not carried.
                    }
                    None => out.numerics.push(Numeric {
                        mdc_code: mdc,
                        label,
                        value,
                        unit: unit(seg, &sep),
                    }),
                }
            }
            // Text, coded and other observations are not carried.
            _ => {}
        }
    }
    Ok(out)
}

/// The acknowledgement code of MSA-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Accepted.
    Accept,
    /// Error: the message was understood but not taken (bad content).
    Error,
    /// Reject: not a message this receiver takes (type, syntax).
    Reject,
}

/// Escapes text for an HL7 field with the standard separators (`|^~\&`, line breaks).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '~' => out.push_str("\\R\\"),
            '&' => out.push_str("\\T\\"),
            '\\' => out.push_str("\\E\\"),
            '\r' => out.push_str("\\X0D\\"),
            '\n' => out.push_str("\\X0A\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An `ACK^R01` for message `control_id` from `sender` (application, facility): MSA with the
/// code and, for an error, the reason in MSA-3 and an ERR segment. `timestamp` is
/// `YYYYMMDDHHMMSS` (UTC), `ack_id` the acknowledgement's own control id.
pub fn ack(
    receiver: (&str, &str),
    sender: (&str, &str),
    timestamp: &str,
    ack_id: &str,
    control_id: &str,
    code: AckCode,
    reason: &str,
) -> String {
    let c = match code {
        AckCode::Accept => "AA",
        AckCode::Error => "AE",
        AckCode::Reject => "AR",
    };
    let mut m = format!(
        "MSH|^~\\&|{}|{}|{}|{}|{}||ACK^R01^ACK|{}|P|2.6\rMSA|{}|{}",
        escape(receiver.0),
        escape(receiver.1),
        escape(sender.0),
        escape(sender.1),
        timestamp,
        escape(ack_id),
        c,
        escape(control_id),
    );
    if code != AckCode::Accept {
        m.push_str(&format!(
            "|{}\rERR||||E|{}|||{}",
            escape(reason),
            if code == AckCode::Reject {
                "200^Unsupported message type^HL70357"
            } else {
                "207^Application internal error^HL70357"
            },
            escape(reason)
        ));
    }
    m.push('\r');
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the IHE PCD Technical Framework's PCD-01 examples (numerics and a WCM waveform).
    pub(crate) fn example() -> String {
        [
            "MSH|^~\\&|MONITOR^0012A3^EUI-64|ACME|RELAY|AMB|20261129100000+0000||ORU^R01^ORU_R01|MSG0001|P|2.6|||AL|NE||8859/1|||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO",
            "PID|||12345^^^Hospital^MR||Doe^John",
            "OBR|1||MSG0001^MONITOR|182777000^monitoring of patient^SCT|||20261129100000+0000",
            "OBX|1|NM|147842^MDC_ECG_HEART_RATE^MDC|1.0.1.1|72|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||R",
            "OBX|2|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.0.1.2|97.5|262688^MDC_DIM_PERCENT^MDC|||||R",
            "OBX|3|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.0.1.3|121|mm[Hg]^mm[Hg]^UCUM|||||R",
            "OBX|4|NA|131330^MDC_ECG_LEAD_II^MDC|1.0.2.1|0.125^0.130^-0.5^1.25|266418^MDC_DIM_MILLI_VOLT^MDC|||||R",
            "OBX|5|NM|67981^MDC_ATTR_SAMP_RATE^MDC|1.0.2.1.1|500|264608^MDC_DIM_PER_SEC^MDC|||||R",
            "OBX|6|NM|68193^MDC_ATTR_NU_MSMT_RES^MDC|1.0.2.1.2|0.005|266418^MDC_DIM_MILLI_VOLT^MDC|||||R",
            "OBX|7|ST|68220^MDC_ATTR_FILTER_LABEL^MDC|1.0.2.1.3|Monitor filter||||||R",
        ]
        .join("\r")
    }

    #[test]
    fn numerics_and_a_waveform_channel_with_its_attributes() {
        let o = parse_oru(&example()).unwrap();
        assert_eq!(o.control_id, "MSG0001");
        assert_eq!(o.sender.1, "ACME");
        assert_eq!(o.profile, PCD01_PROFILE);
        assert_eq!(o.numerics.len(), 3);
        assert_eq!(
            o.numerics[0],
            Numeric {
                mdc_code: 147_842,
                label: "MDC_ECG_HEART_RATE".into(),
                value: 72.0,
                unit: "/min".into()
            }
        );
        assert_eq!(
            (o.numerics[1].value, o.numerics[1].unit.as_str()),
            (97.5, "%")
        );
        assert_eq!(o.numerics[2].unit, "mm[Hg]");
        let w = &o.waveforms[0];
        assert_eq!(
            (w.mdc_code, w.label.as_str(), w.unit.as_str()),
            (131_330, "MDC_ECG_LEAD_II", "mV")
        );
        assert_eq!(w.samples, vec![0.125, 0.130, -0.5, 1.25]);
        assert_eq!((w.sample_rate_hz, w.resolution), (Some(500.0), Some(0.005)));
    }

    #[test]
    fn refusals_say_why() {
        let e = parse_oru("MSH|^~\\&|A|B|C|D|2026||ADT^A01|X|P|2.6").unwrap_err();
        assert_eq!(e, Pcd01Error::Unsupported("ADT^A01".into()));
        assert!(parse_oru("hello").is_err());
        let e = parse_oru(&example().replace("|MSG0001|P|", "||P|")).unwrap_err();
        assert_eq!(e, Pcd01Error::Missing("MSH-10 (message control id)"));
        let e = parse_oru(&example().replace("|72|", "|seventy|")).unwrap_err();
        assert!(
            e.to_string().starts_with("OBX 1: MDC_ECG_HEART_RATE"),
            "{e}"
        );
        let e = parse_oru(&example().replace("^-0.5^", "^x^")).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn acks_echo_the_control_id_and_carry_the_reason() {
        let a = ack(
            ("R", "AMB"),
            ("M", "ACME"),
            "20261129100000",
            "A1",
            "MSG|1",
            AckCode::Error,
            "bad ^ value",
        );
        let m = Message::parse(&a).unwrap();
        assert_eq!(
            m.segment("MSA").unwrap().field(1).unwrap().raw_value(),
            "AE"
        );
        assert_eq!(
            m.segment("MSA").unwrap().field(2).unwrap().raw_value(),
            "MSG\\F\\1"
        );
        assert_eq!(
            m.segment("MSA").unwrap().field(3).unwrap().raw_value(),
            "bad \\S\\ value"
        );
        assert!(m.segment("ERR").is_some());
        let ok = ack(
            ("R", "AMB"),
            ("M", "ACME"),
            "20261129100000",
            "A2",
            "MSG2",
            AckCode::Accept,
            "",
        );
        assert!(ok.ends_with("MSA|AA|MSG2\r"), "{ok}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "[A-Z0-9|^~\\\\&\r\n .-]{0,300}") {
            let _ = parse_oru(&format!("MSH|^~\\&|a|b|c|d|e||ORU^R01|1|P|2.6\r{text}"));
            let _ = parse_oru(&text);
        }
    }
}
