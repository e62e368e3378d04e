// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @notice What the distributor needs of the staking contract: stake pulled from the caller,
///         credited to `account`.
interface IStaking {
    function stakeFor(address account, uint256 amount) external;
}

/// @notice What the distributor needs of the token (SogniToken): the per-account claimed
///         amounts live in the same slot as the account's balance, written only by the bound
///         distributor.
interface IClaimBook {
    function claimedOf(address account) external view returns (uint256);
    function bookClaim(address account, uint256 cumulativeAmount, bool pay) external returns (uint256 already);
    function setDistributor(address next) external;
}

/// @title Epoch reward distributor
/// @notice The settlement key posts, once per epoch, the root of an OpenZeppelin
///         StandardMerkleTree of (address account, uint256 cumulativeAmount): everything the
///         account has earned since the network began. A claim against the newest *matured*
///         root pays the difference to what the account already claimed, so a worker who skips
///         epochs claims once, with one proof.
/// @dev Epochs are numbered 1, 2, 3, ... with no gaps. A root may never lower the total of the
///      previous one and may raise it by at most `maxTotalGrowth`. A root matures `claimDelay`
///      seconds after it was posted; claims are checked against the newest matured root, so
///      posting faster than the delay never locks claims (and a bad root can be answered by
///      pausing before it matures, then posting the next epoch).
///      Storage is laid out for gas (docs/CONTRACTS.md, "Storage layout"): the state a claim
///      and a post read shares one slot (`_head`); the newest `RING` epochs live in a ring of
///      fixed slots written with non-zero placeholders at deployment, so a post overwrites
///      two slots instead of creating three; everything older (and each epoch's receipts
///      hash) is history, kept in the `RootPosted`/`AirdropPosted` events. A post that would
///      push the newest matured root out of the ring reverts `TooManyMaturing` (at most
///      `RING - 1` roots mature at once), so claims never lose their root.
///      Amounts fit 96 bits (the token's whole supply is 10^28 < 2^96); a cap set above
///      that is stored as 2^96 - 1, which caps nothing.
///      Also the EIP-712 verifying contract for receipts and offers (name "SogniSupernet",
///      version "3"), and of `StakeAuthorization`, the signature behind gasless auto-staking.
///      A claim that would pay nothing reverts with `NothingToClaim` (rather than succeeding
///      silently) so wallets see the mistake at gas estimation and no gas is spent on a no-op.
///      Roles: DEFAULT_ADMIN_ROLE (one holder, handed over in two steps after
///      `defaultAdminDelay()`; governance's timelock) unpauses, sets the claim delay, the
///      growth cap and each season's airdrop cap and manages roles; GUARDIAN_ROLE may only
///      pause claims (a fast stop without a proposal; the admin may pause too);
///      SETTLEMENT_ROLE posts work epochs' roots (meant for a separate, possibly offline
///      key); AIRDROP_ROLE posts season airdrops.
///      Airdrops: a season's prizes are one epoch of the same numbering and the same
///      cumulative tree (its leaves are the previous root's plus each winner's prize), so one
///      claim pays work and prizes together and no earlier leaf changes. It is posted with
///      `postAirdropRoot`, once per season, its growth bounded by the season's
///      `airdropCap` (set by governance) instead of `maxTotalGrowth`.
contract RewardDistributor is AccessControlDefaultAdminRules, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLEMENT_ROLE = keccak256("SETTLEMENT_ROLE");
    bytes32 public constant AIRDROP_ROLE = keccak256("AIRDROP_ROLE");
    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant STAKE_AUTHORIZATION_TYPEHASH =
        keccak256("StakeAuthorization(address account,uint256 cumulativeAmount,uint16 stakeBps,uint64 deadline)");
    uint16 public constant MAX_BPS = 10_000;
    /// @notice Upper bound of `claimDelay`, so a typo cannot lock claims for years.
    uint256 public constant MAX_CLAIM_DELAY = 30 days;
    /// @notice Epochs kept in storage (the newest ones); older ones are in the events.
    uint256 public constant RING = 32;

    IERC20 public immutable token;
    IStaking public immutable staking;

    // ----- slot 0 after the inherited ones: everything a claim and a post read -----
    uint32 private _latestEpoch;
    uint24 private _claimDelay; // <= MAX_CLAIM_DELAY < 2^24
    bool private _paused;
    uint96 private _totalClaimed;
    uint96 private _latestTotal;
    // Bit positions in that slot (Solidity packs the five in declaration order from bit 0);
    // `_claim` reads and writes the whole slot at once. tests/chain/test_claim_gas_paths.py
    // checks every field through its view after claims.
    uint256 private constant _DELAY_SHIFT = 32;
    uint256 private constant _PAUSED_SHIFT = 56;
    uint256 private constant _CLAIMED_SHIFT = 64;
    uint256 private constant _LATEST_TOTAL_SHIFT = 160;

    // ----- one slot: the settlement key's fast role check and the growth cap it obeys -----
    /// @dev The last account granted SETTLEMENT_ROLE while it still holds it (zero
    ///      otherwise); others with the role go through `hasRole`.
    address private _settler;
    uint96 private _maxTotalGrowth;

    /// @dev One epoch in the ring: slot `epoch % RING`.
    struct Meta {
        uint32 epoch; // 0: placeholder, nothing posted here yet
        uint64 postedAt;
        uint96 total;
    }

    bytes32[RING] private _roots;
    Meta[RING] private _meta;

    /// @dev One season's airdrop: its cap and the epoch that paid it (0: not posted).
    struct Season {
        uint96 cap;
        uint32 epoch;
    }

    mapping(uint256 season => Season) private _seasons;

    event RootPosted(uint256 indexed epoch, bytes32 root, uint256 total, bytes32 receiptsHash);
    /// @param epoch the matured epoch whose root the claim was verified against.
    event Claimed(address indexed account, uint256 indexed epoch, uint256 amount, uint256 cumulativeAmount);
    /// @notice After a `Claimed` from `claimAndStake`: how the amount was split.
    event AutoStaked(address indexed account, uint256 indexed epoch, uint256 staked, uint256 paid);
    event ClaimDelaySet(uint256 claimDelay);
    event MaxTotalGrowthSet(uint256 maxTotalGrowth);
    event AirdropCapSet(uint256 indexed season, uint256 cap);
    event AirdropPosted(uint256 indexed season, uint256 indexed epoch, uint256 amount);
    event Paused(address account);
    /// @notice The token's claimed counters were handed to `next` (a new distributor).
    event ClaimsHandedOver(address indexed next);
    event Unpaused(address account);

    error ZeroAddress();
    error ZeroRoot();
    error RootAlreadyPosted(uint256 epoch);
    error EpochNotNext(uint256 epoch, uint256 expected);
    error TotalDecreased(uint256 total, uint256 previous);
    error GrowthCapExceeded(uint256 growth, uint256 cap);
    error Underfunded(uint256 owed, uint256 balance);
    error ClaimDelayTooLong(uint256 claimDelay, uint256 maximum);
    error NoRoot();
    error NotMatured(uint256 opensAt);
    error InvalidProof();
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    error ClaimExceedsRootTotal(uint256 totalClaimedAfter, uint256 rootTotal);
    error StakeBpsTooHigh(uint16 stakeBps, uint16 maximum);
    error AuthorizationExpired(uint64 deadline);
    error InvalidStakeAuthorization(address account);
    error ZeroSeason();
    error AirdropAlreadyPosted(uint256 season, uint256 epoch);
    error AirdropCapExceeded(uint256 season, uint256 growth, uint256 cap);
    /// @notice Posting now would push the newest matured root out of the ring; retry at `opensAt`.
    error TooManyMaturing(uint256 opensAt);
    error EnforcedPause();
    error ExpectedPause();
    /// @notice `handOverClaims` to something that is not a distributor of the same token.
    error InvalidSuccessor(address next);

    /// @param token_ the reward token (SOGNI) this contract holds and pays out.
    /// @param staking_ where `claimAndStake` stakes (through `stakeFor`).
    /// @param admin the single DEFAULT_ADMIN_ROLE holder (governance).
    /// @param settlement gets SETTLEMENT_ROLE (zero: nobody yet; the admin grants it later).
    /// @param adminTransferDelay seconds between `beginDefaultAdminTransfer` and its acceptance.
    /// @param claimDelay_ seconds a posted root waits before claims use it.
    /// @param maxTotalGrowth_ cap on how much one root's total may exceed the previous one's.
    constructor(
        IERC20 token_,
        IStaking staking_,
        address admin,
        address settlement,
        uint48 adminTransferDelay,
        uint256 claimDelay_,
        uint256 maxTotalGrowth_
    ) AccessControlDefaultAdminRules(adminTransferDelay, admin) EIP712("SogniSupernet", "3") {
        if (address(token_) == address(0) || address(staking_) == address(0)) revert ZeroAddress();
        token = token_;
        staking = staking_;
        if (settlement != address(0)) _grantRole(SETTLEMENT_ROLE, settlement);
        _setClaimDelay(claimDelay_);
        _setMaxTotalGrowth(maxTotalGrowth_);
        // Non-zero placeholders: every later post overwrites (5k gas a slot) instead of
        // creating (22.1k). A placeholder's epoch is 0, so no lookup ever matches it.
        for (uint256 i; i < RING; ++i) {
            _roots[i] = bytes32(uint256(1));
            _meta[i] = Meta({epoch: 0, postedAt: 1, total: 0});
        }
    }

    // ----- settlement -----

    /// @notice Publish the payout root for `epoch`, which must be `latestEpoch + 1`.
    /// @param total sum of all cumulative amounts in the tree: at least the previous root's
    ///        total, at most `maxTotalGrowth` more, and covered by this contract's balance plus
    ///        what was already claimed, so every leaf is payable.
    /// @param receiptsHash content address of the epoch's published receipts file (kept in
    ///        the `RootPosted` event).
    function postRoot(uint256 epoch, bytes32 root, uint256 total, bytes32 receiptsHash) external {
        address settler = _settler;
        uint256 cap = _maxTotalGrowth; // same slot as `_settler`
        if (msg.sender != settler) _checkRole(SETTLEMENT_ROLE);
        uint256 growth = _checkNext(epoch, root, total);
        if (growth > cap) revert GrowthCapExceeded(growth, cap);
        _record(epoch, root, total, receiptsHash);
    }

    /// @notice Publish `season`'s prize airdrop as epoch `epoch` (`latestEpoch + 1`): a root
    ///         of the same cumulative tree, adding at most `airdropCap[season]` to the total.
    ///         Once per season.
    /// @param evidenceHash content address of the published airdrop evidence (per board, per
    ///        account: the inputs to the points, the points and the prize).
    function postAirdropRoot(uint256 epoch, uint256 season, bytes32 root, uint256 total, bytes32 evidenceHash)
        external
        onlyRole(AIRDROP_ROLE)
    {
        if (season == 0) revert ZeroSeason();
        Season storage s = _seasons[season];
        uint256 done = s.epoch;
        if (done != 0) revert AirdropAlreadyPosted(season, done);
        uint256 growth = _checkNext(epoch, root, total);
        uint256 cap = s.cap;
        // a season governance never opened (cap 0) takes no root at all: one adding nothing
        // could still move every unclaimed leaf to the key holder's accounts
        if (cap == 0 || growth > cap) revert AirdropCapExceeded(season, growth, cap);
        s.epoch = SafeCast.toUint32(epoch);
        _record(epoch, root, total, evidenceHash);
        emit AirdropPosted(season, epoch, growth);
    }

    /// @dev The checks every root passes (next epoch, non-zero, total not lower, funded);
    ///      returns how much it adds to the previous total.
    function _checkNext(uint256 epoch, bytes32 root, uint256 total) private view returns (uint256 growth) {
        if (root == bytes32(0)) revert ZeroRoot();
        uint256 latest = _latestEpoch;
        if (epoch != 0 && epoch <= latest) revert RootAlreadyPosted(epoch);
        unchecked {
            if (epoch != latest + 1) revert EpochNotNext(epoch, latest + 1); // latest < 2^32
        }
        uint256 previous = _latestTotal;
        if (total < previous) revert TotalDecreased(total, previous);
        unchecked {
            growth = total - previous;
        }
        uint256 balance = token.balanceOf(address(this));
        uint256 claimedSoFar = _totalClaimed;
        uint256 owed;
        unchecked {
            owed = total > claimedSoFar ? total - claimedSoFar : 0;
        }
        if (owed > balance) revert Underfunded(owed, balance);
    }

    /// @dev Overwrites ring slot `epoch % RING` (epoch `epoch - RING`, if any: it must not be
    ///      the newest matured one) and the head.
    function _record(uint256 epoch, bytes32 root, uint256 total, bytes32 receiptsHash) private {
        uint96 total96 = SafeCast.toUint96(total); // <= balance + claimed <= 2 * supply < 2^96
        uint256 delay = _claimDelay;
        if (delay != 0 && epoch > RING) {
            // after this post the oldest epoch held is epoch - RING + 1: it must have matured
            uint256 opensAt = uint256(_meta[(epoch + 1) % RING].postedAt) + delay;
            if (opensAt > block.timestamp) revert TooManyMaturing(opensAt);
        }
        uint256 i = epoch % RING;
        _roots[i] = root;
        _meta[i] = Meta({epoch: uint32(epoch), postedAt: uint64(block.timestamp), total: total96});
        _latestEpoch = uint32(epoch); // epoch == latest + 1 and the ring needs < 2^32 posts
        _latestTotal = total96;
        emit RootPosted(epoch, root, total, receiptsHash);
    }

    // ----- claims -----

    /// @notice Pay `account` its `cumulativeAmount` (a leaf of the newest matured root) minus
    ///         what it already claimed.
    /// @dev Anyone may submit (a relayer can pay gas); tokens always go to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        returns (uint256 amount)
    {
        (, amount) = _claim(account, cumulativeAmount, proof, true); // the token pays
    }

    /// @notice Claim for `account` and stake `stakeBps`/10000 of the amount for it in `staking`;
    ///         the rest goes to `account`. Anyone may submit it (a relayer pays the gas); unless
    ///         the caller is `account`, `signature` must be `account`'s EIP-712 signature
    ///         (or ERC-1271 approval) of
    ///         `StakeAuthorization(account, cumulativeAmount, stakeBps, deadline)` under this
    ///         contract's domain. The submitter receives nothing.
    /// @return staked the part staked for `account`.
    /// @return paid the part sent to `account`.
    function claimAndStake(
        address account,
        uint256 cumulativeAmount,
        bytes32[] calldata proof,
        uint16 stakeBps,
        uint64 deadline,
        bytes calldata signature
    ) external returns (uint256 staked, uint256 paid) {
        if (_paused) revert EnforcedPause();
        if (stakeBps > MAX_BPS) revert StakeBpsTooHigh(stakeBps, MAX_BPS);
        if (block.timestamp > deadline) revert AuthorizationExpired(deadline);
        if (msg.sender != account) {
            bytes32 digest = _hashTypedDataV4(
                keccak256(abi.encode(STAKE_AUTHORIZATION_TYPEHASH, account, cumulativeAmount, stakeBps, deadline))
            );
            if (!SignatureChecker.isValidSignatureNowCalldata(account, digest, signature)) {
                revert InvalidStakeAuthorization(account);
            }
        }
        (uint256 epoch, uint256 amount) = _claim(account, cumulativeAmount, proof, false);
        staked = amount * stakeBps / MAX_BPS;
        paid = amount - staked;
        emit AutoStaked(account, epoch, staked, paid);
        if (staked > 0) {
            token.forceApprove(address(staking), staked);
            staking.stakeFor(account, staked);
        }
        if (paid > 0) token.safeTransfer(account, paid);
    }

    /// @dev Checks the pause, verifies against the newest matured root and books the claim
    ///      in the token (which, with `pay`, also pays `account` the whole amount). Written
    ///      for gas (docs/CONTRACTS.md, "Storage layout (gas)"): the head slot is read once and
    ///      written once (`totalClaimed` spliced in), the root is read once, the leaf and the
    ///      proof are hashed in scratch memory straight from calldata, and `account`'s
    ///      claimed amount shares its token balance's slot (one token call reads it, writes
    ///      it and pays). Same checks, errors and event as the plain Solidity it replaced.
    function _claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof, bool pay)
        private
        returns (uint256 epoch, uint256 amount)
    {
        uint256 head;
        assembly ("memory-safe") {
            head := sload(_latestEpoch.slot)
        }
        if ((head >> _PAUSED_SHIFT) & 0xff != 0) revert EnforcedPause();
        epoch = uint32(head);
        if (epoch == 0) revert NoRoot();
        uint256 rootTotal;
        uint256 delay = uint24(head >> _DELAY_SHIFT);
        if (delay == 0) {
            rootTotal = head >> _LATEST_TOTAL_SHIFT;
        } else {
            (epoch, rootTotal) = _maturedUnder(epoch, delay);
        }
        if (!_verify(proof, _roots[epoch % RING], _leaf(account, cumulativeAmount))) revert InvalidProof();
        // books claimed[account] = cumulativeAmount (and pays) unless it is not above what was
        // claimed before; every check below reverts the booking with it
        uint256 already = IClaimBook(address(token)).bookClaim(account, cumulativeAmount, pay);
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        unchecked {
            amount = cumulativeAmount - already;
        }
        // An honest tree's leaves never decrease per account, so this never fires; it bounds
        // what a root that moves amounts between accounts could pay out to its `total`.
        uint256 claimedAfter = uint96(head >> _CLAIMED_SHIFT) + amount;
        if (claimedAfter > rootTotal) revert ClaimExceedsRootTotal(claimedAfter, rootTotal);
        // claimedAfter <= rootTotal < 2^96: replace the head's `totalClaimed` bits only
        assembly ("memory-safe") {
            let mask := shl(_CLAIMED_SHIFT, 0xffffffffffffffffffffffff)
            sstore(_latestEpoch.slot, or(and(head, not(mask)), shl(_CLAIMED_SHIFT, claimedAfter)))
        }
        emit Claimed(account, epoch, amount, cumulativeAmount);
    }

    /// @dev The StandardMerkleTree leaf of (account, cumulativeAmount):
    ///      `keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))))`.
    function _leaf(address account, uint256 cumulativeAmount) private pure returns (bytes32 leaf) {
        assembly ("memory-safe") {
            mstore(0x00, and(account, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(0x20, cumulativeAmount)
            mstore(0x00, keccak256(0x00, 0x40))
            leaf := keccak256(0x00, 0x20)
        }
    }

    /// @dev OpenZeppelin `MerkleProof.verifyCalldata` (sorted-pair keccak), without its
    ///      per-step function calls and bounds checks: reads the proof from calldata, hashes in
    ///      scratch space.
    function _verify(bytes32[] calldata proof, bytes32 root, bytes32 leaf) private pure returns (bool ok) {
        assembly ("memory-safe") {
            if proof.length {
                let ptr := proof.offset
                let end := add(ptr, shl(5, proof.length))
                for {} 1 {} {
                    let sibling := calldataload(ptr)
                    // smaller hash first: leaf at 0x00 and sibling at 0x20, or the other way round
                    let at := shl(5, lt(sibling, leaf))
                    mstore(at, leaf)
                    mstore(xor(at, 0x20), sibling)
                    leaf := keccak256(0x00, 0x40)
                    ptr := add(ptr, 0x20)
                    if eq(ptr, end) { break }
                }
            }
            ok := eq(leaf, root)
        }
    }

    /// @dev The newest matured epoch and its total under a non-zero `delay`, `latest` (non-zero)
    ///      already read; reverts `NotMatured` before the first root matures.
    function _maturedUnder(uint256 latest, uint256 delay) private view returns (uint256 epoch, uint256 total) {
        epoch = _maturedEpoch(latest, delay);
        if (epoch == 0) {
            uint256 oldest = latest > RING ? latest - RING + 1 : 1;
            revert NotMatured(uint256(_meta[oldest % RING].postedAt) + delay);
        }
        total = _meta[epoch % RING].total;
    }

    // ----- pause: the guardian stops, governance resumes -----

    /// @notice Stop claims. GUARDIAN_ROLE (or the admin); only the admin unpauses.
    function pause() external {
        if (!hasRole(GUARDIAN_ROLE, msg.sender)) _checkRole(DEFAULT_ADMIN_ROLE);
        if (_paused) revert EnforcedPause();
        _paused = true;
        emit Paused(msg.sender);
    }

    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!_paused) revert ExpectedPause();
        _paused = false;
        emit Unpaused(msg.sender);
    }

    function paused() external view returns (bool) {
        return _paused;
    }

    // ----- admin -----

    /// @notice Change how long a posted root waits before claims use it (applies to every
    ///         root at once, including those already posted).
    function setClaimDelay(uint256 newDelay) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setClaimDelay(newDelay);
    }

    function setMaxTotalGrowth(uint256 newCap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setMaxTotalGrowth(newCap);
    }

    /// @notice Governance's cap on what `season`'s airdrop may add to the total; fixed once
    ///         the season's airdrop is posted.
    function setAirdropCap(uint256 season, uint256 cap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (season == 0) revert ZeroSeason();
        Season storage s = _seasons[season];
        uint256 done = s.epoch;
        if (done != 0) revert AirdropAlreadyPosted(season, done);
        s.cap = _clamp96(cap);
        emit AirdropCapSet(season, cap);
    }

    function _setClaimDelay(uint256 newDelay) private {
        if (newDelay > MAX_CLAIM_DELAY) revert ClaimDelayTooLong(newDelay, MAX_CLAIM_DELAY);
        _claimDelay = uint24(newDelay);
        emit ClaimDelaySet(newDelay);
    }

    function _setMaxTotalGrowth(uint256 newCap) private {
        _maxTotalGrowth = _clamp96(newCap);
        emit MaxTotalGrowthSet(newCap);
    }

    /// @dev Amounts past 2^96 - 1 exceed the token's supply: the cap is then no cap.
    function _clamp96(uint256 value) private pure returns (uint96) {
        return value > type(uint96).max ? type(uint96).max : uint96(value);
    }

    /// @dev Keeps `_settler` (the settlement key's one-SLOAD role check) in step with the role.
    function _grantRole(bytes32 role, address account) internal override returns (bool granted) {
        granted = super._grantRole(role, account);
        if (role == SETTLEMENT_ROLE) _settler = account;
    }

    function _revokeRole(bytes32 role, address account) internal override returns (bool revoked) {
        revoked = super._revokeRole(role, account);
        if (role == SETTLEMENT_ROLE && _settler == account) _settler = address(0);
    }

    /// @notice Hand the token's per-account claimed amounts to `next`, the distributor that
    ///         replaces this one (it continues the same cumulative tree, so nothing is paid
    ///         twice); this contract's claims then revert `NotDistributor`. Governance only;
    ///         `next` must be a contract whose `token()` is this one's (`InvalidSuccessor`),
    ///         so a typo cannot strand the counters.
    function handOverClaims(address next) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!_isDistributorOfToken(next)) revert InvalidSuccessor(next);
        IClaimBook(address(token)).setDistributor(next);
        emit ClaimsHandedOver(next);
    }

    /// @dev A typo guard, not a proof: `next` answers `token()` with this token and `RING()`
    ///      like a distributor (Staking, say, has the first but not the second).
    function _isDistributorOfToken(address next) private view returns (bool) {
        if (next.code.length == 0) return false;
        try RewardDistributor(next).token() returns (IERC20 t) {
            if (address(t) != address(token)) return false;
        } catch {
            return false;
        }
        try RewardDistributor(next).RING() returns (uint256 ring) {
            return ring == RING;
        } catch {
            return false;
        }
    }

    // ----- views -----

    /// @notice What `account` has claimed so far (kept in the token, next to its balance).
    function claimed(address account) external view returns (uint256) {
        return IClaimBook(address(token)).claimedOf(account);
    }

    function latestEpoch() external view returns (uint256) {
        return _latestEpoch;
    }

    function claimDelay() external view returns (uint256) {
        return _claimDelay;
    }

    function maxTotalGrowth() external view returns (uint256) {
        return _maxTotalGrowth;
    }

    function totalClaimed() external view returns (uint256) {
        return _totalClaimed;
    }

    function airdropCap(uint256 season) external view returns (uint256) {
        return _seasons[season].cap;
    }

    /// @notice The epoch that paid `season`'s prizes (0: not posted yet).
    function airdropEpochOf(uint256 season) external view returns (uint256) {
        return _seasons[season].epoch;
    }

    /// @notice The newest epoch whose root has matured (`postedAt + claimDelay <= now`), the
    ///         one claims are checked against; 0 if none has.
    /// @dev `postedAt` never decreases with the epoch, so this is a binary search over the
    ///      ring (a few storage reads however many epochs are still maturing).
    function maturedEpoch() public view returns (uint256) {
        return _maturedEpoch(_latestEpoch, _claimDelay);
    }

    function _maturedEpoch(uint256 latest, uint256 delay) private view returns (uint256) {
        if (latest == 0 || delay > block.timestamp) return 0;
        uint256 cutoff = block.timestamp - delay;
        if (_meta[latest % RING].postedAt <= cutoff) return latest;
        // invariant: lo is before the ring or postedAt[lo] <= cutoff; postedAt[hi] > cutoff
        uint256 floor = latest > RING ? latest - RING : 0; // not held (evicted or none)
        uint256 lo = floor;
        uint256 hi = latest;
        while (hi - lo > 1) {
            uint256 mid = (lo + hi) / 2;
            if (_meta[mid % RING].postedAt <= cutoff) lo = mid;
            else hi = mid;
        }
        return lo == floor ? 0 : lo;
    }

    /// @notice The root claims are checked against now (zero if none has matured).
    function claimableRoot() external view returns (bytes32) {
        return rootOf(maturedEpoch());
    }

    /// @notice The most recently posted root (zero before the first post); claims use
    ///         `claimableRoot()`, which is this one once it has matured.
    function latestRoot() external view returns (bytes32) {
        return rootOf(_latestEpoch);
    }

    /// @notice Merkle root posted for `epoch` while it is among the newest `RING` (zero
    ///         otherwise: older roots are in the `RootPosted` events).
    function rootOf(uint256 epoch) public view returns (bytes32) {
        return _held(epoch) ? _roots[epoch % RING] : bytes32(0);
    }

    /// @notice Sum of the cumulative amounts in `epoch`'s tree (zero if not held).
    function totalOf(uint256 epoch) external view returns (uint256) {
        return _held(epoch) ? _meta[epoch % RING].total : 0;
    }

    /// @notice Timestamp of the block that posted `epoch`'s root (zero if not held).
    function postedAt(uint256 epoch) external view returns (uint256) {
        return _held(epoch) ? _meta[epoch % RING].postedAt : 0;
    }

    function _held(uint256 epoch) private view returns (bool) {
        return epoch != 0 && _meta[epoch % RING].epoch == epoch;
    }

    /// @notice The EIP-712 domain separator receipts and stake authorizations are signed under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}
